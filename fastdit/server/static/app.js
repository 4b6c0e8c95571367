// Sends the form to /v1/images/generations/stream and reads its server-sent events:
// `progress` {step, total} moves the bar, `result` (the OpenAI response) shows the image,
// `error` (an OpenAI error) shows its message. #status's data-state is idle|running|done|error.
"use strict";

const $ = (id) => document.getElementById(id);

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.classList.toggle("error", state === "error"); // keeps "row": the status stays in the wide column
  status.textContent = text;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("apikey").value) h.Authorization = `Bearer ${$("apikey").value}`;
  return h;
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    size: $("size").value,
    num_inference_steps: Number($("steps").value),
    true_cfg_scale: Number($("cfg").value),
    response_format: "b64_json",
  };
  if ($("negative").value) body.negative_prompt = $("negative").value;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

// Yields {event, data} for each server-sent event in a fetch response body.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

async function generate(event) {
  event.preventDefault();
  const button = $("generate");
  const progress = $("progress");
  button.disabled = true;
  progress.value = 0;
  setStatus("running", "Queued…");
  const started = performance.now();
  try {
    const response = await fetch("/v1/images/generations/stream", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody()),
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({ error: { message: response.statusText } }));
      throw new Error(`${response.status}: ${error.error.message}`);
    }
    for await (const { event: kind, data } of serverSentEvents(response)) {
      if (kind === "progress") {
        progress.max = data.total;
        progress.value = data.step;
        setStatus("running", `Step ${data.step} / ${data.total}`);
      } else if (kind === "result") {
        const image = $("image");
        image.src = `data:image/png;base64,${data.data[0].b64_json}`;
        image.hidden = false;
        await image.decode();
        const seconds = ((performance.now() - started) / 1000).toFixed(1);
        setStatus("done", `Done in ${seconds} s (${image.naturalWidth}x${image.naturalHeight})`);
        return;
      } else if (kind === "error") {
        throw new Error(`${data.status}: ${data.error.message}`);
      }
    }
    throw new Error("the server closed the stream without a result");
  } catch (error) {
    setStatus("error", String(error.message || error));
  } finally {
    button.disabled = false;
  }
}

$("form").addEventListener("submit", generate);
