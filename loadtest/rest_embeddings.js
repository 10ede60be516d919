// OpenAI-compatible REST: POST /v1/embeddings with one text per request.
import http from 'k6/http';
import { check } from 'k6';
import { MODEL, options as baseOptions, sentence } from './common.js';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8000';

export const options = baseOptions({
  http_req_failed: ['rate<0.01'],
  http_req_duration: ['p(99)<2000'],
});

export default function () {
  const res = http.post(`${BASE}/v1/embeddings`, JSON.stringify({ model: MODEL, input: sentence() }), {
    headers: { 'Content-Type': 'application/json' },
  });
  check(res, {
    'status 200': (r) => r.status === 200,
    'one 384-d embedding': (r) => r.status === 200 && r.json('data.0.embedding').length === 384,
  });
}
