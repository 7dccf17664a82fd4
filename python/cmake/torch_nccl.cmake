# Included before project() by `pip install .` (pyproject.toml sets CMAKE_PROJECT_INCLUDE_BEFORE):
# when EPX_NCCL_ROOT is not given, point it at the NCCL that PyTorch loads (the nvidia-nccl-cu*
# wheel, a folder with include/ and lib/libnccl.so.2), so that the process holds one libnccl.
if(NOT EPX_NCCL_ROOT)
  set(epx_python "${Python_EXECUTABLE}")
  if(NOT epx_python)
    set(epx_python "${PYTHON_EXECUTABLE}")
  endif()
  if(epx_python)
    execute_process(
      COMMAND "${epx_python}" -c "import nvidia.nccl as n; print(list(n.__path__)[0])"
      OUTPUT_VARIABLE epx_torch_nccl OUTPUT_STRIP_TRAILING_WHITESPACE
      RESULT_VARIABLE epx_torch_nccl_rc ERROR_QUIET)
    if(epx_torch_nccl_rc EQUAL 0 AND EXISTS "${epx_torch_nccl}/include/nccl.h")
      set(EPX_NCCL_ROOT "${epx_torch_nccl}" CACHE PATH "NCCL of the PyTorch installation" FORCE)
      message(STATUS "epx: using PyTorch's NCCL in ${EPX_NCCL_ROOT}")
    else()
      message(STATUS "epx: no nvidia.nccl package next to PyTorch; EPX_NCCL_ROOT stays unset")
    endif()
  endif()
endif()
