// What Dawn needs from the process environment, set before Dawn creates its Vulkan instance (so
// before `webgpu` is imported: import it dynamically after calling prepareEnvironment()).
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

export const LAVAPIPE_ICD = "/usr/share/vulkan/icd.d/lvp_icd.json";

export function prepareEnvironment() {
  // Without it the Vulkan loader Dawn uses complains on every start (it looks for its runtime folder).
  if (!process.env.XDG_RUNTIME_DIR) {
    process.env.XDG_RUNTIME_DIR = fs.mkdtempSync(path.join(os.tmpdir(), "webgpu-node-xdg-"));
  }
  // Only lavapipe: a machine with a GPU driver (or several ICDs) would otherwise hand Dawn another
  // adapter first, and the point of these checks is the one software adapter that has shader-f16.
  // An explicit VK_DRIVER_FILES / VK_ICD_FILENAMES from the caller wins.
  if (!process.env.VK_DRIVER_FILES && !process.env.VK_ICD_FILENAMES && fs.existsSync(LAVAPIPE_ICD)) {
    process.env.VK_DRIVER_FILES = LAVAPIPE_ICD;
  }
}

// The adapter as the reports name it.
export function describeAdapter(adapter) {
  const info = adapter.info ?? {};
  const mesa = /Mesa (\d+)\.(\d+)/.exec(info.description ?? "");
  return {
    vendor: info.vendor,
    architecture: info.architecture,
    device: info.device,
    description: info.description,
    is_lavapipe: /llvmpipe/i.test(`${info.description} ${info.device}`),
    mesa_version: mesa ? `${mesa[1]}.${mesa[2]}` : null,
    features: [...adapter.features].sort(),
    shader_f16_available: adapter.features.has("shader-f16"),
  };
}
