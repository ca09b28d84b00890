# Read by llama.cpp's project() when llama-cpp-python is built from source (the Makefile's CMAKE_ARGS):
# build only the libraries llama-cpp-python loads (libllama, libggml*). llama-cpp-python forces llama.cpp's
# common library on (its chat parsers, Jinja engine and argument parser), which it never loads and which is
# half of the build's time: 7 min 20 s -> 3 min 42 s on 2 cores.
set(LLAMA_BUILD_COMMON OFF)
