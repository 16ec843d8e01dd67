// Whether this machine can run the f16 checks: Dawn's adapter (lavapipe only, see environment.mjs),
// its features, and one `enable f16;` compute shader that must compute 1.5 * 2 = 3 in f16.
// Prints one JSON object; exit 0 only when all of that worked. tests/webgpu_node/dawn.py runs it.
import { describeAdapter, prepareEnvironment } from "./environment.mjs";

const report = { ok: false, adapter: null, f16_result: null, error: null };

function finish(code) {
  // Dawn keeps threads alive after the work is done: Node would not exit by itself.
  process.stdout.write(`${JSON.stringify(report)}\n`, () => process.exit(code));
}

async function main() {
  prepareEnvironment();
  const { create, globals } = await import("webgpu");
  Object.assign(globalThis, globals);
  const gpu = create(["backend=vulkan"]);
  const adapter = await gpu.requestAdapter();
  if (!adapter) {
    report.error = "Dawn found no Vulkan adapter (Mesa's lavapipe missing, or older than Mesa 25, which Dawn refuses)";
    return finish(1);
  }
  report.adapter = describeAdapter(adapter);
  if (!report.adapter.is_lavapipe) {
    report.error = `Dawn's adapter is "${report.adapter.description}", not Mesa's lavapipe (llvmpipe)`;
    return finish(1);
  }
  if (!report.adapter.shader_f16_available) {
    report.error = `adapter "${report.adapter.description}" has no shader-f16 (lavapipe has it from Mesa 25)`;
    return finish(1);
  }
  const device = await adapter.requestDevice({ requiredFeatures: ["shader-f16"] });
  const module = device.createShaderModule({
    code: `enable f16;
@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(1) fn main() { let h: f16 = f16(1.5) * f16(2.0); out[0] = f32(h); }`,
  });
  const buffer = device.createBuffer({ size: 4, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC });
  const read = device.createBuffer({ size: 4, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const pipeline = device.createComputePipeline({ layout: "auto", compute: { module, entryPoint: "main" } });
  const bind = device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: [{ binding: 0, resource: { buffer } }],
  });
  const encoder = device.createCommandEncoder();
  const pass = encoder.beginComputePass();
  pass.setPipeline(pipeline);
  pass.setBindGroup(0, bind);
  pass.dispatchWorkgroups(1);
  pass.end();
  encoder.copyBufferToBuffer(buffer, 0, read, 0, 4);
  device.queue.submit([encoder.finish()]);
  await read.mapAsync(GPUMapMode.READ);
  report.f16_result = new Float32Array(read.getMappedRange())[0];
  if (report.f16_result !== 3) {
    report.error = `an f16 shader computed 1.5 * 2 = ${report.f16_result} on "${report.adapter.description}"`;
    return finish(1);
  }
  report.ok = true;
  finish(0);
}

main().catch((error) => {
  report.error = `unexpected: ${error?.stack ?? error}`;
  finish(1);
});
