// Shared settings for Rankway's k6 scripts. Every run is bounded in count and time:
// ITERATIONS requests at most, shared by VUS virtual users, stopped after MAX_DURATION.
export const VUS = Number(__ENV.VUS || 32);
export const ITERATIONS = Number(__ENV.ITERATIONS || 3000);
export const MAX_DURATION = __ENV.MAX_DURATION || '60s';
export const MODEL = __ENV.MODEL || 'minilm';

export const SENTENCES = [
  'The quick brown fox jumps over the lazy dog.',
  'Rankway batches requests from many clients into one forward pass.',
  'A tensor-parallel group shares every batch across its ranks.',
  'Kubernetes restarts the whole group when one rank fails.',
  'Short text.',
];

export function sentence() {
  return SENTENCES[(__VU + __ITER) % SENTENCES.length];
}

// With RATE set, an open-loop run instead: RATE requests per second for DURATION
// (bounded by RATE x DURATION requests), however fast the server answers.
const RATE = Number(__ENV.RATE || 0);
const DURATION = __ENV.DURATION || '20s';

function scenario() {
  if (RATE > 0) {
    return {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: VUS * 4,
    };
  }
  return { executor: 'shared-iterations', vus: VUS, iterations: ITERATIONS, maxDuration: MAX_DURATION };
}

export function options(extraThresholds) {
  return {
    scenarios: { load: scenario() },
    thresholds: Object.assign(
      {
        checks: ['rate>0.99'],
      },
      extraThresholds,
    ),
    summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(99)', 'max'],
  };
}
