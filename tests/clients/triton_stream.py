"""tritonclient.grpc, unmodified, against Rankway: one streamed generation over
ModelStreamInfer (start_stream + async_stream_infer) and one unary ModelInfer of the
same prompt. Prints one JSON object; tests/tests/generation_gateway.rs checks it.

Usage: python tests/clients/triton_stream.py HOST:PORT MODEL PROMPT MAX_TOKENS
"""

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient

url, model, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = grpcclient.InferenceServerClient(url=url)


def text_input():
    t = grpcclient.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    return [t]


answers = queue.Queue()
client.start_stream(callback=lambda result, error: answers.put((result, error)))
client.async_stream_infer(model, text_input(), request_id="s1",
                          parameters={"max_tokens": max_tokens, "temperature": 0, "stream": True})
deltas, final, errors = [], None, []
while final is None:
    result, error = answers.get(timeout=60)
    if error is not None:
        errors.append(str(error))
        break
    response = result.get_response()
    deltas.append(result.as_numpy("text_output")[0].decode())
    params = response.parameters
    if params["triton_final_response"].bool_param:
        final = {"finish_reason": params["finish_reason"].string_param,
                 "completion_tokens": params["completion_tokens"].int64_param, "id": response.id}
# A bad request on the same stream gets an error, and the stream goes on.
client.async_stream_infer(model, text_input(), parameters={"max_tokens": 2, "beam_width": 4})
_, error = answers.get(timeout=60)
client.stop_stream()

unary = client.infer(model, text_input(), parameters={"max_tokens": max_tokens})
print(json.dumps({"deltas": deltas, "final": final, "errors": errors, "bad": str(error),
                  "unary": unary.as_numpy("text_output")[0].decode()}))
