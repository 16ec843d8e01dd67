// Runs the real WebLLM (the pinned @mlc-ai/web-llm) in Node on Dawn's WebGPU (npm `webgpu`), to
// generate greedy tokens from llm2wasm bundles on a machine whose browser has no `shader-f16`:
// headless Chromium offers SwiftShader only, while Dawn on Mesa's lavapipe (Mesa >= 25) has it.
//
//   node run.mjs BUNDLE... --prompt TEXT --max-tokens N
//
// Every bundle runs in this one process, one after the other (Dawn and WebLLM start once for the
// whole matrix). Each bundle folder is served over HTTP on 127.0.0.1 under a path of its own, its
// app config's base URL is replaced by that path's (as the preview server does), and the completion
// runs exactly as the preview page's `state.complete` (src/llm2wasm/image/preview/preview.js), so
// both give the same JSON. One JSON object goes to stdout at the end, {ok, runs: [one report per
// bundle, in order], errors}; the exit status is 0 only when every bundle generated on an adapter
// that has every feature it requires.
import fs from "node:fs";
import http from "node:http";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import { describeAdapter, prepareEnvironment } from "./environment.mjs";

const report = { ok: false, runs: [], errors: [] };

function finish(code) {
  // Dawn keeps threads alive after the work is done: Node would not exit by itself.
  process.stdout.write(`${JSON.stringify(report)}\n`, () => process.exit(code));
}

function failWith(message) {
  report.errors.push(message);
  finish(1);
}

// The bundles over HTTP, bundle i under /i/: GET/HEAD of regular files inside it, none hidden
// (.llm2wasm), no symlinks. A path per bundle (not a server each) so that no two bundles ever share
// a URL, which WebLLM's caches key on.
function serveBundles(roots) {
  const realRoots = roots.map((root) => fs.realpathSync(root));
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
    const [index, ...parts] = relative.split("/").filter((part) => part !== "");
    const realRoot = /^\d+$/.test(index ?? "") ? realRoots[Number(index)] : undefined;
    if (realRoot === undefined || parts.length === 0 || parts.some((part) => part.startsWith(".") || part.includes("\\"))) {
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
// match, add, keys, delete. In memory and installed afresh for each bundle, so each run loads its
// bundle from the server (never a stale copy) and the previous bundle's weights are let go.
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

// Web Crypto, a browser global that Node has as one from Node 19 only: Debian bookworm's Node 18
// keeps it in node:crypto. WebLLM names each request with crypto.randomUUID().
async function installWebCrypto() {
  if (globalThis.crypto === undefined) {
    const { webcrypto } = await import("node:crypto");
    Object.defineProperty(globalThis, "crypto", { value: webcrypto, configurable: true, writable: true });
  }
}

// navigator.gpu from Dawn. WebLLM picks the adapter (requestAdapter) and asks for the device
// itself, with shader-f16 whenever the adapter has it; the wrapper only records what it was given
// (in `seen`, which the caller empties before each bundle), so each bundle's report can say which
// adapter ran and whether shader-f16 was requested and granted.
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
          // (as the browser check fails on a WebGPU error in the console). Into this bundle's list:
          // a late error of an earlier bundle's device is not charged to the next one.
          const errors = seen.gpuErrors;
          device.addEventListener("uncapturederror", (event) => {
            errors.push(String(event.error?.message ?? event.error ?? event));
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

// One bundle, start to finish: its report (run.ok true only when it generated cleanly).
async function runBundle(webllm, bundle, servedBase, seen, { prompt, maxTokens }) {
  const run = {
    ok: false,
    bundle,
    model_id: null,
    required_features: [],
    adapter: null,
    timings: {},
    result: null,
    errors: [],
  };
  const fail = (message) => {
    run.errors.push(message);
    return run;
  };
  let config;
  try {
    config = JSON.parse(fs.readFileSync(path.join(bundle, "app-config.json"), "utf8"));
  } catch (error) {
    return fail(`${bundle}/app-config.json could not be read: ${error.message}`);
  }
  const record = config.model_list?.[0];
  if (!record) return fail(`${bundle}/app-config.json names no model`);
  run.model_id = record.model_id;
  run.required_features = record.required_features ?? [];
  let appConfig;
  try {
    appConfig = servedConfig(config, servedBase);
  } catch (error) {
    return fail(`${bundle}/app-config.json: ${error.message}`);
  }
  installCaches();
  Object.assign(seen, { adapter: null, requested: null, device: null, gpuErrors: [] });

  // The adapter WebLLM will get (it asks with powerPreference "high-performance"): checked before the
  // load, so a missing feature is said in words rather than as a shader compilation error.
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) {
    return fail(
      "Dawn gave no WebGPU adapter: Mesa's lavapipe (mesa-vulkan-drivers) is missing, or older than Mesa 25, " +
        "which Dawn refuses (see setup.sh)",
    );
  }
  run.adapter = adapterReport(adapter, seen);
  for (const feature of run.required_features) {
    if (!adapter.features.has(feature)) {
      return fail(
        `the bundle requires WebGPU feature "${feature}", which adapter "${run.adapter.description}" lacks ` +
          "(lavapipe has shader-f16 from Mesa 25: mesa-vulkan-drivers from bookworm-backports; see setup.sh)",
      );
    }
  }
  if (run.required_features.includes("shader-f16") && !run.adapter.is_lavapipe) {
    return fail(`the f16 check must run on Mesa's lavapipe, but Dawn gave "${run.adapter.description}"`);
  }

  let engine;
  const loadStarted = performance.now();
  try {
    engine = await webllm.CreateMLCEngine(record.model_id, { appConfig, logLevel: "WARN" });
  } catch (error) {
    return fail(`loading failed: ${error?.stack ?? error}`);
  }
  try {
    run.timings.load_seconds = (performance.now() - loadStarted) / 1000;
    // WebLLM asked for its own adapter and device: report those (they are the ones that ran).
    run.adapter = adapterReport(seen.adapter, seen);
    if (run.required_features.includes("shader-f16") && !run.adapter.shader_f16_granted) {
      return fail("WebLLM's device was not given shader-f16, which the bundle requires");
    }
    try {
      const generateStarted = performance.now();
      run.result = await complete(engine, record.model_id, { prompt, maxTokens, temperature: 0 });
      run.timings.generate_seconds = (performance.now() - generateStarted) / 1000;
    } catch (error) {
      return fail(`generation failed: ${error?.stack ?? error}`);
    }
    if (seen.gpuErrors.length > 0) return fail(`WebGPU errors during the run: ${seen.gpuErrors.join(" | ")}`);
    if (!run.result.tokenIds) return fail("the token ids could not be read from WebLLM's pipeline");
    run.ok = true;
    return run;
  } finally {
    // its device and buffers go before the next bundle's
    await engine.unload().catch((error) => run.errors.push(`unloading failed: ${error?.stack ?? error}`));
  }
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
  if (positionals.length === 0 || values.prompt === undefined) {
    return failWith("usage: node run.mjs BUNDLE... --prompt TEXT [--max-tokens N]");
  }
  const maxTokens = Number(values["max-tokens"]);
  if (!Number.isInteger(maxTokens) || maxTokens < 1) return failWith(`--max-tokens must be a positive integer`);
  const bundles = positionals.map((bundle) => path.resolve(bundle));
  for (const bundle of bundles) {
    if (!fs.existsSync(bundle)) return failWith(`no bundle folder ${bundle}`);
  }

  prepareEnvironment();
  const { create, globals } = await import("webgpu");
  const webllm = await import("@mlc-ai/web-llm");
  const server = await serveBundles(bundles);
  const port = server.address().port;
  installEmscriptenNodeGlobals();
  await installWebCrypto();
  const seen = {};
  installGpu(create, globals, seen);

  for (const [index, bundle] of bundles.entries()) {
    const started = performance.now();
    console.error(`run.mjs: [${index + 1}/${bundles.length}] ${bundle}`);
    const run = await runBundle(webllm, bundle, `http://127.0.0.1:${port}/${index}/`, seen, {
      prompt: values.prompt,
      maxTokens,
    });
    run.timings.total_seconds = (performance.now() - started) / 1000;
    report.runs.push(run);
  }
  server.close();
  report.ok = report.runs.every((run) => run.ok);
  finish(report.ok ? 0 : 1);
}

main().catch((error) => failWith(`unexpected: ${error?.stack ?? error}`));
