# llama.cpp's llama-quantize, llama-imatrix, llama-mtmd-cli and llama-server, compiled from llama.cpp's
# own tree and linked to the shared libraries that the installed llama-cpp-python built from that same
# tree. modelmake copies this file over the top-level CMakeLists.txt of its temporary copy of the tree
# (stages/ground/llamacpp.py, `build`), so llama.cpp's own CMake files for the tools are used as they
# are, and llama.cpp itself (ggml, llama, llama-common, mtmd) is compiled once, by pip, not again here.
#
#   cmake -S <tree> -B <build> -DBINDINGS_LIB=<the folder of libllama, libllama-common, libggml*, libmtmd>
cmake_minimum_required(VERSION 3.21)
project("llama.cpp" C CXX)

if (NOT BINDINGS_LIB)
    message(FATAL_ERROR "-DBINDINGS_LIB=<folder> is required: where llama-cpp-python's libraries are")
endif()
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
if (NOT CMAKE_BUILD_TYPE)
    set(CMAKE_BUILD_TYPE Release)
endif()

# The tools look for the libraries beside themselves (modelmake copies them there), and nowhere else.
set(CMAKE_BUILD_WITH_INSTALL_RPATH ON)
if (APPLE)
    set(CMAKE_INSTALL_RPATH "@loader_path")
else()
    set(CMAKE_INSTALL_RPATH "$ORIGIN")
    # DT_RPATH rather than DT_RUNPATH: libllama-common carries no search path of its own, and only
    # the executable's DT_RPATH also serves what a library it loads needs (libggml).
    add_link_options("LINKER:--disable-new-dtags")
endif()

# What llama.cpp's top-level CMakeLists.txt would set for these subfolders.
set(BUILD_SHARED_LIBS OFF)      # the tools' own helper libraries are linked into them
set(LLAMA_BUILD_COMMON ON)      # vendor/ adds cpp-httplib, which llama-server needs
set(LLAMA_BUILD_TOOLS ON)
set(LLAMA_ALL_WARNINGS OFF)
set(LLAMA_BUILD_UI OFF)         # modelmake runs llama-server with --no-webui:
set(LLAMA_USE_PREBUILT_UI OFF)  # no web UI, so nothing is downloaded
list(APPEND CMAKE_MODULE_PATH "${CMAKE_CURRENT_SOURCE_DIR}/cmake/")
include(cmake/common.cmake)
include(cmake/license.cmake)
find_package(Threads REQUIRED)
add_subdirectory(vendor)

# llama-cpp-python's libraries, under the target names llama.cpp's CMake files link to.
function(bindings_library name include_dirs link_libraries)
    add_library(${name} SHARED IMPORTED GLOBAL)
    set_target_properties(${name} PROPERTIES
        IMPORTED_LOCATION "${BINDINGS_LIB}/${CMAKE_SHARED_LIBRARY_PREFIX}${name}${CMAKE_SHARED_LIBRARY_SUFFIX}"
        INTERFACE_INCLUDE_DIRECTORIES "${include_dirs}"
        INTERFACE_LINK_LIBRARIES "${link_libraries}"
        INTERFACE_COMPILE_DEFINITIONS "GGML_SHARED;LLAMA_SHARED")
endfunction()
set(TREE ${CMAKE_CURRENT_SOURCE_DIR})
bindings_library(ggml-base "${TREE}/ggml/include" "")
bindings_library(ggml "${TREE}/ggml/include" "ggml-base")
bindings_library(llama "${TREE}/include" "ggml;ggml-base")
bindings_library(mtmd "${TREE}/tools/mtmd" "llama")
bindings_library(llama-common "${TREE}/common" "llama;vendor::nlohmann;vendor::sheredom")
# As common/CMakeLists.txt declares them PUBLIC (LLAMA_SUBPROCESS is on by default off mobile and wasm).
set_property(TARGET llama-common APPEND PROPERTY INTERFACE_COMPILE_DEFINITIONS LLAMA_SUBPROCESS)
set_property(TARGET llama-common PROPERTY INTERFACE_COMPILE_FEATURES cxx_std_17)

add_subdirectory(tools/ui)
add_subdirectory(tools/server)
add_subdirectory(tools/quantize)
add_subdirectory(tools/imatrix)
# tools/mtmd/CMakeLists.txt also defines the mtmd library itself; only its command-line runner is wanted.
add_executable(llama-mtmd-cli tools/mtmd/mtmd-cli.cpp)
target_link_libraries(llama-mtmd-cli PRIVATE llama-common mtmd Threads::Threads)
target_compile_features(llama-mtmd-cli PRIVATE cxx_std_17)
