// OIP v2 REST: POST /v2/models/{model}/infer with one text per request.
import http from 'k6/http';
import { check } from 'k6';
import { MODEL, options as baseOptions, sentence } from './common.js';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8000';

export const options = baseOptions({
  http_req_failed: ['rate<0.01'],
  http_req_duration: ['p(99)<2000'],
});

export default function () {
  const body = JSON.stringify({
    inputs: [{ name: 'text', shape: [1], datatype: 'BYTES', data: [sentence()] }],
    outputs: [{ name: 'embedding' }],
  });
  const res = http.post(`${BASE}/v2/models/${MODEL}/infer`, body, {
    headers: { 'Content-Type': 'application/json' },
  });
  check(res, {
    'status 200': (r) => r.status === 200,
    'one 384-d embedding': (r) => r.status === 200 && r.json('outputs.0.shape.1') === 384,
  });
}
