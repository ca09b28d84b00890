# Read by llama.cpp's project() when llama-cpp-python is built from source (the Makefile's CMAKE_ARGS):
# build only the libraries llama-cpp-python loads (libllama, libggml*), and libllama itself with -O1.
#
# llama-cpp-python forces llama.cpp's common library on (its chat parsers, Jinja engine and argument parser), which
# it never loads and which is half of the build's time: 7 min 20 s -> 3 min 42 s on 2 cores.
set(LLAMA_BUILD_COMMON OFF)

# libllama builds the graphs, loads files, tokenizes and samples; the arithmetic is in libggml*, which keeps -O3.
# -O1 cuts libllama's compile time by a third (the build 3 min 12 s -> 2 min 27 s on 2 cores) with the same
# generation and tokenization speed (benchmarked on SmolLM2 Q4_K_M: 51-53 vs 53-56 tokens/s).
function(_tuneship_libllama_at_o1)
  if(TARGET llama AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(llama PRIVATE -O1)
  endif()
endfunction()
if(CMAKE_VERSION VERSION_GREATER_EQUAL 3.19)  # cmake_language(DEFER): after llama.cpp has defined its targets
  cmake_language(DEFER CALL _tuneship_libllama_at_o1)
endif()
