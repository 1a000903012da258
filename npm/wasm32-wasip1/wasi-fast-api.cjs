// Loaded by distcp.wasip1.cjs (scripts/build-wasm.sh puts the require in napi's generated loader) before the
// module is instantiated: every load of the WASM fallback, through src/native.ts or through binding.cjs's chain,
// passes here first.
//
// Root cause of the SIGSEGV on Node 20 and 22 (issue #13): node:wasi gives each WASI import a V8 fast API
// callback, which V8 takes for the module's calls into those imports. The callback runs uvwasi, which allocates
// through Node's NgLibMemoryManager; each allocation calls Isolate::AdjustAmountOfExternalAllocatedMemory, and
// once external memory is past V8's limit that call starts a garbage collection. A GC inside a fast API call is
// not supported by those V8 versions: V8's heap is corrupt from then on, and the process dies later, somewhere
// else (nodejs/node#46777, #53087). Large reads are what get there: each read's result is a JS-owned copy
// (napi-rs on single-threaded wasm never makes external buffers), so a few hundred MB of results push external
// memory past the limit, and the next fd_read or fd_seek's allocation collects. Ruled out on the way: views
// into wasm memory detached by memory.grow (the results are not views: each has its own ArrayBuffer, and results
// held across 512 MiB of later reads keep their bytes), finalizers on other threads (this build has none).
//
// The fix: turn V8's fast API calls off before the module's imports are compiled, so the WASI imports take their
// regular callbacks, where a GC is allowed. Measured here with scripts/wasm-read-smoke.mjs (4 rounds of 8 reads
// of 32 MiB per run): without this, Node 20 crashed in 2 of 6 runs and Node 22 in 6 of 6; with it, none in 10 + 10.
// Node 24 never crashed, with or without it (its fast callbacks differ), so its flags are left alone. The flag is
// process-wide: on Node 20 and 22, once the WASM fallback loads, Node's other fast API functions take their
// regular path too (a small cost, on the fallback path only; the native addon never loads this file).
'use strict'

const major = Number(process.versions.node.split('.')[0])
if (major < 24) require('node:v8').setFlagsFromString('--no-turbo-fast-api-calls')
