// The public typings of `distcp` (package.json `types`). The API is written in TypeScript under src/ and compiled to
// dist/; this file is the one entry a reader opens. The napi binding's own typings are binding.d.cts (generated).
// Every public change shows up in __test__/api/distcp.api.txt (`npm run api:update` regenerates it).
export * from './dist/index.js'
