import test from 'ava'
import { existsSync, mkdtempSync, readdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { convertDcpToHf } from '../src/index.js'
import { root, runPython } from './helpers.js'

const example = join(root, 'examples', 'tiny-llama')

test("pytorchModelBin writes the seed's artefact byte for byte, and torch.load(weights_only=True) reads it", async (t) => {
  const out = join(mkdtempSync(join(tmpdir(), 'distcp-bin-')), 'hf')
  await convertDcpToHf(join(example, 'dcp'), out, join(example, 'model'), join(example, 'tokenizer'), { pytorchModelBin: true })
  t.deepEqual(readdirSync(out).sort(), ['config.json', 'generation_config.json', 'pytorch_model.bin', 'tokenizer.json', 'tokenizer_config.json'])
  t.false(existsSync(join(out, 'model.safetensors')))
  // the seed's pipeline, run by torch: dcp_to_torch_save → torch.load → unwrap `model` → torch.save
  const report = JSON.parse(runPython(['interop/check_torch_bin.py', join(out, 'pytorch_model.bin'), join(example, 'dcp')]).trim().split('\n').pop()!)
  t.deepEqual(report.errors, [])
  t.is(report.tensors, 21) // lm_head.weight kept, as the seed keeps it
  t.true(report.byte_identical)
})
