"""The official OpenAI Python SDK against a running fusion server (base URL as argv[1]).

Run by tests/api/openai_sdk.rs against the real server and the scripted fake upstream, so the
answers are known. Exits non-zero on the first failed check.
"""

import sys

import openai

base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
messages = [{"role": "user", "content": "Why is the sky blue?"}]
FINAL = "the fused final answer"
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


# A plain call: the model name is all that changes.
raw = client.chat.completions.with_raw_response.create(model="fusion", messages=messages)
resp = raw.parse()
check(resp.object == "chat.completion", "plain call returns a chat.completion")
check(resp.choices[0].message.content == FINAL, f"plain call content: {resp.choices[0].message.content!r}")
check(resp.usage.total_tokens > 0, "plain call has usage")
check(raw.headers.get("x-fusion-job-id"), "plain call names its job")

# A call the SDK gives up waiting on (its timeout; a proxy's idle cut looks the same) is sent
# again by the SDK itself, without an idempotency key: the retry waits on the job its first try
# made. The fake holds `slow-sdk`'s answer 1.5 s; the Rust side checks it was asked once.
patient = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=2, timeout=1.0)
resp = patient.chat.completions.create(
    model="vendor/host",
    messages=messages,
    extra_body={"plugins": [{"id": "fusion", "model": "judge", "analysis_models": ["slow-sdk"]}]},
)
check(resp.choices[0].message.content == FINAL, "a call the SDK retried gets its answer")

# Plugins ride in extra_body.
resp = client.chat.completions.create(
    model="vendor/host",
    messages=messages,
    extra_body={"plugins": [{"id": "fusion", "model": "judge", "analysis_models": ["m1", "m2", "m1"]}]},
)
check(resp.choices[0].message.content == FINAL, "plugin call content")

# A streamed call, with usage in the last chunk.
stream = client.chat.completions.create(
    model="fusion/budget", messages=messages, stream=True, stream_options={"include_usage": True}
)
text, usage, finish = "", None, None
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
check(text == FINAL, f"streamed content: {text!r}")
check(finish == "stop", "streamed finish_reason")
check(usage is not None and usage.total_tokens > 0, "streamed usage")

# The model list.
ids = [m.id for m in client.models.list()]
check("fusion" in ids and "fusion/budget" in ids, f"models: {ids}")

# Errors raise the SDK's usual exceptions.
try:
    client.chat.completions.create(model="fusion/nope", messages=messages)
    check(False, "an unknown preset must raise")
except openai.BadRequestError as e:
    check(e.status_code == 400, "unknown preset is a 400")
    check(e.code == "unknown_preset", f"error code: {e.code}")
try:
    client.chat.completions.create(model="fusion", messages=[])
    check(False, "empty messages must raise")
except openai.BadRequestError as e:
    check(e.code == "empty_messages", f"error code: {e.code}")

print(f"openai-sdk: {checks} passed, 0 failed")
