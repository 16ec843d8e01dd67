// Runs the real WebLLM (the pinned @mlc-ai/web-llm) in Node on Dawn's WebGPU (npm `webgpu`), to
// generate greedy tokens from an llm2wasm bundle on a machine whose browser has no `shader-f16`:
// headless Chromium offers SwiftShader only, while Dawn on Mesa's lavapipe (Mesa >= 25) has it.
//
//   node run.mjs BUNDLE --prompt TEXT --max-tokens N
//
// The bundle folder is served over HTTP on 127.0.0.1 (a free port), its app config's base URL is
// replaced by that server's (as the preview server does), and the completion runs exactly as the
// preview page's `state.complete` (src/llm2wasm/image/preview/preview.js), so both give the same
// JSON. One JSON object goes to stdout at the end; the exit status is 0 only when generation worked
// on an adapter that has every feature the bundle requires.
import fs from "node:fs";
import http from "node:http";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import { describeAdapter, prepareEnvironment } from "./environment.mjs";

const report = {
  ok: false,
  bundle: null,
  model_id: null,
  required_features: [],
  adapter: null,
  timings: {},
  result: null,
  errors: [],
};

function finish(code) {
  // Dawn keeps threads alive after the work is done: Node would not exit by itself.
  process.stdout.write(`${JSON.stringify(report)}\n`, () => process.exit(code));
}

function failWith(message) {
  report.errors.push(message);
  finish(1);
}

// The bundle over HTTP: GET/HEAD of regular files inside it, none hidden (.llm2wasm), no symlinks.
function serveBundle(root) {
  const realRoot = fs.realpathSync(root);
  const server = http.createServer((request, response) => {
    const send = (status, body = "", type = "text/plain") => {
      response.writeHead(status, { "Content-Type": type, "Content-Length": Buffer.byteLength(body) });
      response.end(request.method === "HEAD" ? undefined : body);
    };
    if (request.method !== "GET" && request.method !== "HEAD") return send(405, "method not allowed");
    let relative;
    try {
      relative = decodeURIComponent(new URL(request.url, "http://127.0.0.1").pathname);
    } catch {
      return send(400, "bad path");
    }
    const parts = relative.split("/").filter((part) => part !== "");
    if (parts.length === 0 || parts.some((part) => part.startsWith(".") || part.includes("\\"))) {
      return send(404, "not found");
    }
    const file = path.join(realRoot, ...parts);
    let stat;
    try {
      stat = fs.lstatSync(file);
    } catch {
      return send(404, "not found");
    }
    if (!stat.isFile() || fs.realpathSync(file) !== file) return send(404, "not found");
    const types = { ".json": "application/json", ".wasm": "application/wasm" };
    const type = types[path.extname(file)] ?? "application/octet-stream";
    response.writeHead(200, { "Content-Type": type, "Content-Length": stat.size });
    if (request.method === "HEAD") return response.end();
    fs.createReadStream(file).pipe(response);
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve(server));
  });
}

// What model_lib and model share before lib/ and model/: appconfig.bundle_base in Python.
function bundleBase(record) {
  const lib = record.model_lib;
  const marker = lib.lastIndexOf("/lib/");
  if (marker < 0 || !record.model.startsWith(lib.slice(0, marker + 1))) {
    throw new Error("model_lib and model do not share a base URL");
  }
  return lib.slice(0, marker + 1);
}

// appconfig.served_config in Python: the bundle's base URL replaced by the server's.
function servedConfig(config, servedBase) {
  const served = structuredClone(config);
  const original = bundleBase(served.model_list[0]);
  for (const record of served.model_list) {
    for (const key of ["model", "model_lib"]) {
      if (record[key].startsWith(original)) record[key] = servedBase + record[key].slice(original.length);
    }
  }
  return served;
}

// A minimal in-memory Cache API. WebLLM fetches the config, the model library and every weight
// shard through `caches.open(scope)` (its default cacheBackend "cache"; the others are IndexedDB,
// OPFS and the cross-origin storage extension, none of which Node has). Only what WebLLM calls:
// match, add, keys, delete. In memory, so each run loads the bundle afresh (never a stale copy).
class MemoryCache {
  constructor() {
    this.entries = new Map();
  }

  async match(request) {
    const entry = this.entries.get(new Request(request).url);
    if (entry === undefined) return undefined;
    return new Response(entry.body.slice(0), { status: entry.status, headers: entry.headers });
  }

  async add(request) {
    const req = new Request(request);
    const response = await fetch(req);
    // As the Cache API: a failed answer is an error, not a cached 404.
    if (!response.ok) throw new TypeError(`${response.status} ${response.statusText}: ${req.url}`);
    const body = await response.arrayBuffer();
    this.entries.set(req.url, { body, status: response.status, headers: [...response.headers] });
  }

  async keys() {
    return [...this.entries.keys()].map((url) => new Request(url));
  }

  async delete(request) {
    return this.entries.delete(new Request(request).url);
  }
}

function installCaches() {
  const stores = new Map();
  globalThis.caches = {
    async open(scope) {
      if (!stores.has(scope)) stores.set(scope, new MemoryCache());
      return stores.get(scope);
    },
    async has(scope) {
      return stores.has(scope);
    },
    async delete(scope) {
      return stores.delete(scope);
    },
  };
}

// WebLLM is bundled for browsers, but the Emscripten modules inside it (the TVM runtime's WASI
// shim, the tokenizers) see `process.versions.node` and take their Node branch, which names free
// variables that an ES module in Node does not have. Each global below is one of those, given what
// that branch expects; none of them changes what is computed.
function installEmscriptenNodeGlobals() {
  const webllmIndex = import.meta.resolve("@mlc-ai/web-llm");
  // The TVM runtime's shim: `scriptDirectory = __dirname + "/"` (only used to locate files it never
  // reads here: its wasm is handed to it) and `module["exports"] = Module` (a CommonJS habit).
  globalThis.__dirname = path.dirname(fileURLToPath(webllmIndex));
  globalThis.module = { exports: {} };
  // The tokenizers: `createRequire(location.href)`, to require fs/path/crypto; their wasm is inline.
  globalThis.createRequire = createRequire;
  // createRequire needs a file URL, so `location` is where WebLLM's script is, as in a page that
  // loads it. WebLLM itself reads `location.origin` only to resolve a relative model URL, and the
  // served app config names absolute ones.
  globalThis.location = new URL(webllmIndex);
}

// navigator.gpu from Dawn. WebLLM picks the adapter (requestAdapter) and asks for the device
// itself, with shader-f16 whenever the adapter has it; the wrapper only records what it was given,
// so the report can say which adapter ran and whether shader-f16 was requested and granted.
function installGpu(create, globals, seen) {
  // GPUBufferUsage, GPUMapMode, GPUShaderStage...: WebLLM's runtime uses these browser globals.
  Object.assign(globalThis, globals);
  const gpu = create(["backend=vulkan"]);
  const wrapped = {
    async requestAdapter(options) {
      const adapter = await gpu.requestAdapter(options);
      if (adapter) {
        seen.adapter = adapter;
        const requestDevice = adapter.requestDevice.bind(adapter);
        adapter.requestDevice = async (descriptor) => {
          seen.requested = [...(descriptor?.requiredFeatures ?? [])];
          const device = await requestDevice(descriptor);
          seen.device = device;
          // WebLLM only logs these; a WebGPU error makes the tokens suspect, so the run fails on one
          // (as the browser check fails on a WebGPU error in the console).
          device.addEventListener("uncapturederror", (event) => {
            seen.gpuErrors.push(String(event.error?.message ?? event.error ?? event));
          });
          return device;
        };
      }
      return adapter;
    },
    getPreferredCanvasFormat: () => gpu.getPreferredCanvasFormat(),
    get wgslLanguageFeatures() {
      return gpu.wgslLanguageFeatures;
    },
  };
  // Node 20 has no `navigator`; Node >= 21 has one without `gpu`.
  if (globalThis.navigator === undefined) {
    Object.defineProperty(globalThis, "navigator", { value: { gpu: wrapped }, configurable: true, writable: true });
  } else {
    Object.defineProperty(globalThis.navigator, "gpu", { value: wrapped, configurable: true });
  }
  return gpu;
}

// The adapter, and what WebLLM asked of it and was given (seen: what installGpu recorded).
function adapterReport(adapter, seen) {
  return {
    ...describeAdapter(adapter),
    shader_f16_requested: seen.requested ? seen.requested.includes("shader-f16") : null,
    shader_f16_granted: seen.device ? seen.device.features.has("shader-f16") : null,
    requested_features: seen.requested ?? null,
  };
}

// preview.js state.complete + finished(): the same request and the same result shape.
async function complete(engine, modelId, { prompt, maxTokens = 16, temperature = 0 }) {
  const started = performance.now();
  let first = null;
  let text = "";
  let usage = null;
  const chunks = await engine.completions.create({
    prompt,
    max_tokens: maxTokens,
    temperature,
    stream: true,
    stream_options: { include_usage: true },
  });
  for await (const chunk of chunks) {
    const delta = chunk.choices?.[0]?.text || "";
    if (delta && first === null) first = (performance.now() - started) / 1000;
    text += delta;
    if (chunk.usage) usage = chunk.usage;
  }
  const seconds = (performance.now() - started) / 1000;
  // The token ids WebLLM sampled, read from its pipeline (internal state, as the preview page does).
  const pipeline = engine.loadedModelIdToPipeline?.get(modelId);
  const tokenIds = pipeline ? Array.from(pipeline.outputIds) : null;
  const decodeRate = usage?.extra?.decode_tokens_per_s;
  return {
    text,
    tokenIds,
    firstTokenSeconds: first,
    seconds,
    tokensPerSecond: decodeRate ?? (tokenIds ? tokenIds.length / seconds : null),
    usage,
  };
}

async function main() {
  // WebLLM and Dawn log progress with console.log/info: to stderr, so stdout is the one JSON object.
  console.log = console.error;
  console.info = console.error;
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      prompt: { type: "string" },
      "max-tokens": { type: "string", default: "16" },
    },
  });
  if (positionals.length !== 1 || values.prompt === undefined) {
    return failWith("usage: node run.mjs BUNDLE --prompt TEXT [--max-tokens N]");
  }
  const maxTokens = Number(values["max-tokens"]);
  if (!Number.isInteger(maxTokens) || maxTokens < 1) return failWith(`--max-tokens must be a positive integer`);
  const bundle = path.resolve(positionals[0]);
  report.bundle = bundle;

  let config;
  try {
    config = JSON.parse(fs.readFileSync(path.join(bundle, "app-config.json"), "utf8"));
  } catch (error) {
    return failWith(`${bundle}/app-config.json could not be read: ${error.message}`);
  }
  const record = config.model_list?.[0];
  if (!record) return failWith(`${bundle}/app-config.json names no model`);
  report.model_id = record.model_id;
  report.required_features = record.required_features ?? [];

  prepareEnvironment();
  const { create, globals } = await import("webgpu");
  const webllm = await import("@mlc-ai/web-llm");

  const server = await serveBundle(bundle);
  const servedBase = `http://127.0.0.1:${server.address().port}/`;
  const appConfig = servedConfig(config, servedBase);
  installEmscriptenNodeGlobals();
  installCaches();
  const seen = { gpuErrors: [] };
  installGpu(create, globals, seen);

  // The adapter WebLLM will get (it asks with powerPreference "high-performance"): checked before the
  // load, so a missing feature is said in words rather than as a shader compilation error.
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) {
    return failWith(
      "Dawn gave no WebGPU adapter: Mesa's lavapipe (mesa-vulkan-drivers) is missing, or older than Mesa 25, " +
        "which Dawn refuses (see setup.sh)",
    );
  }
  report.adapter = adapterReport(adapter, seen);
  for (const feature of report.required_features) {
    if (!adapter.features.has(feature)) {
      return failWith(
        `the bundle requires WebGPU feature "${feature}", which adapter "${report.adapter.description}" lacks ` +
          "(lavapipe has shader-f16 from Mesa 25: mesa-vulkan-drivers from bookworm-backports; see setup.sh)",
      );
    }
  }
  if (report.required_features.includes("shader-f16") && !report.adapter.is_lavapipe) {
    return failWith(`the f16 check must run on Mesa's lavapipe, but Dawn gave "${report.adapter.description}"`);
  }

  let engine;
  const loadStarted = performance.now();
  try {
    engine = await webllm.CreateMLCEngine(record.model_id, { appConfig, logLevel: "WARN" });
  } catch (error) {
    return failWith(`loading failed: ${error?.stack ?? error}`);
  }
  report.timings.load_seconds = (performance.now() - loadStarted) / 1000;
  // WebLLM asked for its own adapter and device: report those (they are the ones that ran).
  report.adapter = adapterReport(seen.adapter, seen);
  if (report.required_features.includes("shader-f16") && !report.adapter.shader_f16_granted) {
    return failWith("WebLLM's device was not given shader-f16, which the bundle requires");
  }

  try {
    const generateStarted = performance.now();
    report.result = await complete(engine, record.model_id, { prompt: values.prompt, maxTokens, temperature: 0 });
    report.timings.generate_seconds = (performance.now() - generateStarted) / 1000;
  } catch (error) {
    return failWith(`generation failed: ${error?.stack ?? error}`);
  }
  if (seen.gpuErrors.length > 0) return failWith(`WebGPU errors during the run: ${seen.gpuErrors.join(" | ")}`);
  if (!report.result.tokenIds) return failWith("the token ids could not be read from WebLLM's pipeline");
  report.ok = true;
  server.close();
  finish(0);
}

main().catch((error) => failWith(`unexpected: ${error?.stack ?? error}`));
