// Sends the form to /v1/images/generations/stream (or, in edit mode, the images and fields as multipart/form-data
// to /v1/images/edits/stream) and reads its server-sent events: `progress` {step, total} moves the bar, `result`
// (the OpenAI response) shows the image, `error` (an OpenAI error) shows its message. #status's data-state is
// idle|running|done|error. The body's data-max-images says how many images the model edits (0: none; empty while
// it loads: the page then waits for /health and reloads) and data-needs-image whether it only edits.
"use strict";

const $ = (id) => document.getElementById(id);
const maxImages = document.body.dataset.maxImages;
const editing = () => $("mode").value === "edit";

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.classList.toggle("error", state === "error"); // keeps "row": the status stays in the wide column
  status.textContent = text;
}

function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if ($("apikey").value) h.Authorization = `Bearer ${$("apikey").value}`;
  return h;
}

// Shows the edit controls (the image upload, size "auto") in edit mode, the text-to-image ones otherwise.
function setMode(mode) {
  $("mode").value = mode;
  for (const element of document.querySelectorAll(".editing")) element.hidden = mode !== "edit";
  const size = $("size");
  if (mode === "edit") size.value = "auto";
  else if (size.value === "auto") size.value = "1024x1024";
}

function showPreviews() {
  const previews = $("previews");
  previews.replaceChildren();
  for (const file of $("images").files) {
    const thumbnail = document.createElement("img");
    thumbnail.src = URL.createObjectURL(file);
    thumbnail.alt = file.name;
    previews.append(thumbnail);
  }
}

async function waitForTheModel() {
  setStatus("idle", "The model is loading…");
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const health = await fetch("/health").catch(() => null);
    if (health && health.ok) return location.reload();
  }
}

// OpenAI's edit fields as multipart/form-data: one image as `image`, several as `image[]`.
function editBody() {
  const files = [...$("images").files];
  if (!files.length) throw new Error("choose an image to edit");
  if (files.length > Number(maxImages)) throw new Error(`this model takes at most ${maxImages} images`);
  const form = new FormData();
  for (const file of files) form.append(files.length > 1 ? "image[]" : "image", file);
  for (const [name, value] of Object.entries(requestBody())) form.append(name, String(value));
  return form;
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
    const edit = editing();
    const response = await fetch(edit ? "/v1/images/edits/stream" : "/v1/images/generations/stream", {
      method: "POST",
      headers: headers(!edit),
      body: edit ? editBody() : JSON.stringify(requestBody()),
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
$("mode").addEventListener("change", () => setMode($("mode").value));
$("images").addEventListener("change", showPreviews);
if (maxImages === "") {
  waitForTheModel();
} else if (Number(maxImages) > 0) {
  for (const element of document.querySelectorAll(".edits")) element.hidden = false;
  $("images").multiple = Number(maxImages) > 1;
  if (document.body.dataset.needsImage === "true") $("mode").querySelector("[value=generate]").disabled = true;
  setMode(document.body.dataset.needsImage === "true" ? "edit" : "generate");
}
