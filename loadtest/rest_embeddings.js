// OpenAI-compatible REST: POST /v1/embeddings with one text per request. It asks for
// base64 embeddings, as the OpenAI SDKs do when the caller names no encoding_format
// (openai-python's prepare_embedding_request); ENCODING_FORMAT=float asks for JSON
// numbers instead, which cost k6's JavaScript far more to parse.
import http from 'k6/http';
import encoding from 'k6/encoding';
import { check } from 'k6';
import { MODEL, options as baseOptions, sentence } from './common.js';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8000';
const FORMAT = __ENV.ENCODING_FORMAT || 'base64';
const DIMS = 384;

export const options = baseOptions({
  http_req_failed: ['rate<0.01'],
  http_req_duration: ['p(99)<2000'],
});

// The number of floats in one answer's embedding, in either format.
function dims(embedding) {
  return FORMAT === 'base64' ? encoding.b64decode(embedding, 'std').byteLength / 4 : embedding.length;
}

export default function () {
  const body = JSON.stringify({ model: MODEL, input: sentence(), encoding_format: FORMAT });
  const res = http.post(`${BASE}/v1/embeddings`, body, {
    headers: { 'Content-Type': 'application/json' },
  });
  check(res, {
    'status 200': (r) => r.status === 200,
    [`one ${DIMS}-d embedding`]: (r) => r.status === 200 && dims(r.json('data.0.embedding')) === DIMS,
  });
}
