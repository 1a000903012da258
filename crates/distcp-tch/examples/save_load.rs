//! Saves a small tch model as a DCP checkpoint and loads it into a second, freshly initialised model.
//!
//! cargo run --example save_load -- /tmp/tch-ckpt
//! then, in Python: dcp.load({"model": sd}, checkpoint_id="/tmp/tch-ckpt") with sd = a state dict of the same names
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

/// `Sequential(Linear(4, 8), LayerNorm(8), ReLU(), Linear(8, 2))` with torch's parameter names (`0.weight`, ...).
fn model(vs: &VarStore) -> impl Module {
  let root = vs.root();
  nn::seq()
    .add(nn::linear(&root / "0", 4, 8, Default::default()))
    .add(nn::layer_norm(&root / "1", vec![8], Default::default()))
    .add_fn(|x| x.relu())
    .add(nn::linear(&root / "3", 8, 2, Default::default()))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
  let dir = std::env::args().nth(1).unwrap_or_else(|| "tch-ckpt".to_owned());
  let device = Device::cuda_if_available();

  tch::manual_seed(0);
  let vs = VarStore::new(device);
  let net = model(&vs);
  let summary = distcp_tch::save_var_store(&vs, &dir)?;
  println!("saved {} tensors ({} bytes) to {dir}: {:?}", summary.tensors, summary.data_bytes, summary.keys);

  tch::manual_seed(1);
  let mut vs2 = VarStore::new(device);
  let net2 = model(&vs2);
  let loaded = distcp_tch::load_var_store(&mut vs2, &dir).map_err(|e| format!("{} ({})", e, e.code()))?;
  println!("loaded {} tensors", loaded.len());

  let x = Tensor::randn([3, 4], (Kind::Float, device));
  let same = net.forward(&x).equal(&net2.forward(&x));
  println!("outputs equal after the round trip: {same}");
  if !same {
    return Err("the loaded model computes something else".into());
  }
  Ok(())
}
