/* Stand-in for a library of an MLC CUDA wheel (TVM's runtime): it links the driver API directly, as
 * apache/tvm's cmake/modules/CUDA.cmake links CUDA_CUDA_LIBRARY, so it carries NEEDED libcuda.so.1
 * and is linked with -z now (every symbol resolved at load time, the strictest case). */
int cuInit(unsigned int flags);
int cuDriverGetVersion(int *version);
int cuModuleLoadData(void **module, const void *image);

/* What the loaded driver says: its version, or minus the CUresult of the failed call (-34 is
 * CUDA_ERROR_STUB_LIBRARY). */
int standin_driver_version(void) {
  int version = -1;
  int status = cuInit(0);
  if (status == 0) status = cuDriverGetVersion(&version);
  return status ? -status : version;
}

void *standin_load_module(void) {
  void *module = 0;
  cuModuleLoadData(&module, 0);
  return module;
}
