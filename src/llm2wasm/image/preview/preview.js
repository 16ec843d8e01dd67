// The llm2wasm preview page: loads the bundle's app config with the WebLLM the image ships,
// shows load progress, streams answers with tokens/s, and says in words what went wrong.
// window.llm2wasmPreview exposes the same engine to tests (see tests/integration/test_browser.py).
const $ = (id) => document.getElementById(id);
const state = { errors: [], retries: [], ready: false, engine: null, modelId: null, mode: "complete", messages: [] };
window.llm2wasmPreview = state;

function fail(message) {
  state.errors.push(message);
  $("error").hidden = false;
  $("error").textContent = message;
  $("status").textContent = "Stopped.";
  $("send").disabled = true;
}

function explain(error) {
  const text = String(error && error.message ? error.message : error);
  if (/404|Not Found|Failed to fetch/i.test(text)) {
    return `A file of the model could not be loaded: ${text}`;
  }
  return text;
}

// A fetch that fails without an HTTP answer ("Failed to fetch") is what Chrome gives when the
// network changed during the load (net::ERR_NETWORK_CHANGED: an interface came or went, as
// Docker's do when a container with a network starts or stops). The file is there: load again.
const LOAD_ATTEMPTS = 3;
function isTransient(error) {
  const text = String(error && error.message ? error.message : error);
  return /Failed to fetch|NetworkError|network changed|ERR_NETWORK/i.test(text) && !/\b40[0-9]\b/.test(text);
}

async function withRetries(what, action) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await action();
    } catch (error) {
      if (attempt >= LOAD_ATTEMPTS || !isTransient(error)) throw error;
      const note = `${what}: the connection failed (${explain(error)}); trying again (${attempt + 1} of ${LOAD_ATTEMPTS})`;
      state.retries.push(note);
      console.warn(note);
      $("status").textContent = note;
      await new Promise((resolve) => setTimeout(resolve, 1000 * attempt));
    }
  }
}

async function checkFile(url, what) {
  const response = await fetch(url, { method: "HEAD" });
  if (!response.ok) throw new Error(`${response.status}: ${new URL(url).pathname} not found (${what})`);
}

// Where WebLLM reads a record's weights (its cleanModelUrl): the URL when it names a revision
// (a published entry's .../resolve/main/), else resolve/main/ under it (a bundle's .../model/).
function weightsUrl(model) {
  const base = model.endsWith("/") ? model : `${model}/`;
  return /.+\/resolve\/.+\//.test(base) ? base : `${base}resolve/main/`;
}

// A published entry's conversation template, read from its mlc-chat-config.json (null: none).
async function publishedConversation(info) {
  try {
    const response = await fetch(new URL("mlc-chat-config.json", info.weights_url).href);
    const conv = response.ok ? (await response.json()).conv_template : null;
    if (!conv || typeof conv !== "object") return null;
    const { name, system_message, stop_str, stop_token_ids } = conv;
    return { name, system_message, stop_str, stop_token_ids };
  } catch (error) {
    return null;
  }
}

async function main() {
  const info = await (await fetch("/preview-info.json")).json();
  $("model").textContent = info.model_id;
  if (info.published) {
    $("note").hidden = false;
    $("note").textContent = `This page runs the published model_list entry: WebLLM loads the model from `
      + `${info.weights_url} and its library from ${info.model_lib}, as any WebLLM app given that entry does.`;
  }
  // Chat is the default when the bundle has a conversation template (what WebLLM apps use).
  const conv = info.published ? await publishedConversation(info) : info.conversation;
  if (conv) {
    $("template").textContent = `· conversation template ${conv.name}, stops on `
      + `${JSON.stringify(conv.stop_str || [])} / ids ${JSON.stringify(conv.stop_token_ids || [])}`;
    $("system").value = conv.system_message || "";
  } else {
    $("mode-chat").disabled = true;
  }
  setMode(conv ? "chat" : "complete");
  $("webllm").textContent = info.webllm_version || "not installed";
  state.modelId = info.model_id;
  if (info.rewritten) {
    $("note").hidden = false;
    $("note").textContent = `This bundle was made for ${info.bundle_base}; it is served here from ${info.served_base}, `
      + "so the preview replaced that base URL in the app config it hands to WebLLM (the file on disk is unchanged).";
  }
  if (!navigator.gpu) {
    return fail("This browser has no WebGPU (navigator.gpu is missing). Use a current Chrome or Edge; "
      + "Chromium on Linux needs --enable-unsafe-webgpu.");
  }
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) return fail("WebGPU is there but gave no adapter: the GPU or its driver is not supported.");
  for (const feature of info.required_features) {
    if (!adapter.features.has(feature)) {
      return fail(`This bundle needs the WebGPU feature "${feature}" (an f16 quantization), which this adapter lacks. `
        + "Convert with an f32 quantization (q4f32_1 or q0f32), or use a GPU that has it.");
    }
  }
  let webllm;
  try {
    webllm = await import("/webllm/index.js");
  } catch (error) {
    return fail(`WebLLM could not be loaded from /webllm/index.js: ${explain(error)}`);
  }
  const appConfig = await (await fetch("/app-config.json")).json();
  // IndexedDB: a failed fetch then names its URL (the Cache API's errors do not).
  appConfig.cacheBackend = "indexeddb";
  const record = appConfig.model_list[0];
  try {
    await withRetries("checking the bundle", async () => {
      await checkFile(record.model_lib, "the model library, model_lib");
      await checkFile(new URL("tensor-cache.json", weightsUrl(record.model)).href, "the weights index");
    });
  } catch (error) {
    return fail(explain(error));
  }
  $("status").textContent = "Loading the model…";
  const started = performance.now();
  try {
    state.engine = await withRetries("loading the model", () => webllm.CreateMLCEngine(info.model_id, {
      appConfig,
      initProgressCallback: (report) => {
        $("progress").value = report.progress;
        $("status").textContent = report.text;
      },
    }));
  } catch (error) {
    return fail(`Loading failed: ${explain(error)}`);
  }
  state.loadSeconds = (performance.now() - started) / 1000;
  $("status").textContent = `Ready (loaded in ${state.loadSeconds.toFixed(1)} s).`;
  $("progress").value = 1;
  $("send").disabled = false;
  state.ready = true;
}

// One completion; resolves to {text, tokenIds, firstTokenSeconds, tokensPerSecond}.
state.complete = async function complete({ prompt, maxTokens = 16, temperature = 0, onText = null }) {
  const engine = state.engine;
  const started = performance.now();
  let first = null;
  let text = "";
  const chunks = await engine.completions.create({
    prompt, max_tokens: maxTokens, temperature, stream: true, stream_options: { include_usage: true },
  });
  let usage = null;
  for await (const chunk of chunks) {
    const delta = chunk.choices?.[0]?.text || "";
    if (delta && first === null) first = (performance.now() - started) / 1000;
    text += delta;
    if (onText) onText(text);
    if (chunk.usage) usage = chunk.usage;
  }
  return finished(started, first, text, usage);
};

// What a generation returns: its text, the token ids WebLLM sampled (read from its pipeline:
// internal state, for checks only), the time to the first token and the decode rate.
function finished(started, first, text, usage) {
  const seconds = (performance.now() - started) / 1000;
  const pipeline = state.engine.loadedModelIdToPipeline?.get(state.modelId);
  const tokenIds = pipeline ? Array.from(pipeline.outputIds) : null;
  const decodeRate = usage?.extra?.decode_tokens_per_s;
  return { text, tokenIds, firstTokenSeconds: first, seconds, tokensPerSecond: decodeRate ?? (tokenIds ? tokenIds.length / seconds : null), usage };
}

// One chat turn through engine.chat.completions (the conversation template wraps the messages);
// the turn is added to state.messages. Resolves like complete().
state.chat = async function chat({ content, system = null, maxTokens = 16, temperature = 0, onText = null }) {
  const engine = state.engine;
  const started = performance.now();
  const messages = [];
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.messages, { role: "user", content });
  showMessage("user", content);
  const bubble = showMessage("assistant", "");
  let first = null;
  let text = "";
  let usage = null;
  const chunks = await engine.chat.completions.create({
    messages, max_tokens: maxTokens, temperature, stream: true, stream_options: { include_usage: true },
  });
  for await (const chunk of chunks) {
    const delta = chunk.choices?.[0]?.delta?.content || "";
    if (delta && first === null) first = (performance.now() - started) / 1000;
    text += delta;
    bubble.textContent = text;
    if (onText) onText(text);
    if (chunk.usage) usage = chunk.usage;
  }
  state.messages.push({ role: "user", content }, { role: "assistant", content: text });
  return finished(started, first, text, usage);
};

state.reset = async function reset() {
  state.messages = [];
  $("messages").textContent = "";
  $("answer").textContent = "";
  if (state.engine) await state.engine.resetChat();
};

function setMode(mode) {
  state.mode = mode;
  $(`mode-${mode}`).checked = true;
  $("chat-only").hidden = mode !== "chat";
  $("answer-block").hidden = mode === "chat";
  $("reset").hidden = mode !== "chat";
  $("prompt-label").textContent = mode === "chat" ? "Message" : "Prompt";
}

function showMessage(role, text) {
  const item = document.createElement("div");
  item.className = `message ${role}`;
  item.textContent = text;
  $("messages").append(item);
  return item;
}

$("mode-chat").addEventListener("change", () => setMode("chat"));
$("mode-complete").addEventListener("change", () => setMode("complete"));
$("reset").addEventListener("click", () => state.reset());

$("chat").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("send").disabled = true;
  $("answer").textContent = "";
  $("speed").textContent = "";
  const options = { maxTokens: Number($("max-tokens").value) || 64, temperature: $("greedy").checked ? 0 : 0.7 };
  try {
    let result;
    if (state.mode === "chat") {
      result = await state.chat({ ...options, content: $("prompt").value, system: $("system").value || null });
      $("prompt").value = "";
    } else {
      result = await state.complete({ ...options, prompt: $("prompt").value, onText: (text) => { $("answer").textContent = text; } });
    }
    const rate = result.tokensPerSecond ? `${result.tokensPerSecond.toFixed(1)} tokens/s` : "";
    $("speed").textContent = `first token after ${(result.firstTokenSeconds ?? result.seconds).toFixed(2)} s · ${rate}`;
  } catch (error) {
    fail(`Generation failed: ${explain(error)}`);
  } finally {
    $("send").disabled = !state.ready;
  }
});

main().catch((error) => fail(explain(error)));
