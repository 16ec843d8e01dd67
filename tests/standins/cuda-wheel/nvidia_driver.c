/* Stand-in for the NVIDIA driver's libcuda.so.1, which the NVIDIA container toolkit mounts into a
 * container started with --gpus. Three driver API functions, answering as a working driver would;
 * cuDriverGetVersion reports 13000 so a test can tell this driver from llm2wasm's stub. */
int cuInit(unsigned int flags) { (void)flags; return 0; }
int cuDriverGetVersion(int *version) { *version = 13000; return 0; }
int cuModuleLoadData(void **module, const void *image) { (void)image; *module = 0; return 0; }
