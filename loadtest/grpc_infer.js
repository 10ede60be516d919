// OIP v2 gRPC: inference.GRPCInferenceService/ModelInfer with the project's proto.
import grpc from 'k6/net/grpc';
import encoding from 'k6/encoding';
import { check } from 'k6';
import { Trend } from 'k6/metrics';
import { MODEL, options as baseOptions, sentence } from './common.js';

const ADDR = __ENV.GRPC_ADDR || '127.0.0.1:8001';
const client = new grpc.Client();
client.load(['../proto/proto'], 'grpc_predict_v2.proto');

const latency = new Trend('rankway_grpc_duration', true);

export const options = baseOptions({
  grpc_req_duration: ['p(99)<2000'],
});

export default function () {
  if (__ITER === 0) {
    client.connect(ADDR, { plaintext: true });
  }
  const started = Date.now();
  const res = client.invoke('inference.GRPCInferenceService/ModelInfer', {
    model_name: MODEL,
    inputs: [
      {
        name: 'text',
        datatype: 'BYTES',
        shape: [1],
        contents: { bytes_contents: [encoding.b64encode(sentence())] },
      },
    ],
  });
  latency.add(Date.now() - started);
  check(res, {
    'status OK': (r) => r && r.status === grpc.StatusOK,
    'one 384-d embedding': (r) =>
      r && r.status === grpc.StatusOK && r.message.outputs[0].shape[1] === '384',
  });
}
