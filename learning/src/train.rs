//! Local training (mini-batch SGD) and evaluation of an [`Architecture`]
//! on in-memory data.
//!
//! Everything here maps a flat parameter vector to a flat result: a client
//! receives the global model's parameters, [`Trainer::train`] returns the
//! update (new − old) and the number of samples behind it, ready for
//! [`crate::compress`], [`crate::dp`] and [`crate::aggregate`].
//!
//! Training is deterministic for a given seed: the seed drives the
//! per-epoch shuffles through the crate's ChaCha20 stream, initial
//! parameters come from [`Architecture::init_params`], and no layer draws
//! random numbers (there is no dropout), so the backend's own RNG is never
//! consulted. On the default CPU backend the arithmetic is single-threaded
//! and runs in a fixed order, so the same inputs give bit-identical outputs;
//! GPU backends may reorder floating-point sums between runs.

use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::model::ArchitectureDescriptor;
use crate::models::{Architecture, Network, to_vec};
use crate::{Error, Result, SeededRng};

/// Largest mini-batch accepted.
pub const MAX_BATCH_SIZE: usize = 1 << 16;
/// Most local epochs accepted.
pub const MAX_EPOCHS: u32 = 10_000;
/// Samples per forward pass in [`Trainer::evaluate`]; bounds memory, not
/// results.
pub const EVAL_BATCH: usize = 1024;

/// Hyper-parameters of local SGD.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Step size.
    pub learning_rate: f64,
    /// Passes over the local data per round (`E`).
    pub epochs: u32,
    /// Samples per step (`B`); the last batch of an epoch may be smaller.
    pub batch_size: usize,
    /// Heavy-ball momentum in `[0, 1)` (no dampening), if any. Its state
    /// starts from zero at every call, so it does not carry across rounds.
    #[serde(default)]
    pub momentum: Option<f64>,
}

impl TrainConfig {
    /// Plain SGD.
    pub fn sgd(learning_rate: f64, epochs: u32, batch_size: usize) -> Self {
        TrainConfig {
            learning_rate,
            epochs,
            batch_size,
            momentum: None,
        }
    }

    /// Checks the ranges: learning rate finite and positive, 1..=
    /// [`MAX_EPOCHS`] epochs, batch size 1..=[`MAX_BATCH_SIZE`], momentum in
    /// `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(Error::invalid(
                "learning rate",
                format!("{} is not a finite positive number", self.learning_rate),
            ));
        }
        if !(1..=MAX_EPOCHS).contains(&self.epochs) {
            return Err(Error::invalid(
                "epochs",
                format!("{} is not in 1..={MAX_EPOCHS}", self.epochs),
            ));
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return Err(Error::invalid(
                "batch size",
                format!("{} is not in 1..={MAX_BATCH_SIZE}", self.batch_size),
            ));
        }
        if let Some(m) = self.momentum
            && !(0.0..1.0).contains(&m)
        {
            return Err(Error::invalid("momentum", format!("{m} is not in [0, 1)")));
        }
        Ok(())
    }
}

/// Where tensors are computed. The CPU backend is always there; GPU
/// backends exist when the crate is built with their cargo feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Compute {
    /// burn's portable pure-Rust CPU backend (`flex`), single-threaded
    /// unless the `parallel` feature is on.
    #[default]
    Cpu,
    /// An NVIDIA GPU by index (feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda(usize),
    /// The default wgpu adapter: Vulkan, Metal or DirectX (feature `wgpu`).
    #[cfg(feature = "wgpu")]
    Wgpu,
}

impl Compute {
    /// The burn device for this choice, without autodiff.
    pub fn device(&self) -> Device {
        match self {
            Compute::Cpu => Device::flex(),
            #[cfg(feature = "cuda")]
            Compute::Cuda(index) => Device::cuda(*index),
            #[cfg(feature = "wgpu")]
            Compute::Wgpu => Device::wgpu(Default::default()),
        }
    }
}

/// What one client's local training produced.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalUpdate {
    /// New parameters minus the parameters training started from.
    pub delta: Vec<f32>,
    /// Samples trained on (the FedAvg weight).
    pub samples: u64,
    /// SGD steps taken.
    pub steps: u64,
    /// Mean training loss over all steps (cross-entropy, nats).
    pub mean_loss: f64,
}

/// How far local training has come, reported after every step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// Steps done, from 1.
    pub step: u64,
    /// Steps the whole call takes (epochs × batches per epoch).
    pub total_steps: u64,
    /// Mean training loss so far.
    pub mean_loss: f64,
}

/// Accuracy and loss of a model on a data set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Fraction of samples whose highest logit is the label.
    pub accuracy: f64,
    /// Mean cross-entropy in nats.
    pub loss: f64,
    /// Samples evaluated.
    pub samples: u64,
}

/// Trains and evaluates one architecture on one device.
#[derive(Clone, Debug)]
pub struct Trainer {
    arch: Architecture,
    descriptor: ArchitectureDescriptor,
    device: Device,
}

impl Trainer {
    /// A trainer for `arch` on `compute`, checking the architecture.
    pub fn new(arch: Architecture, compute: Compute) -> Result<Self> {
        let descriptor = arch.descriptor()?;
        Ok(Trainer {
            arch,
            descriptor,
            device: compute.device(),
        })
    }

    /// The architecture.
    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// Its descriptor.
    pub fn descriptor(&self) -> &ArchitectureDescriptor {
        &self.descriptor
    }

    /// Checks that `data` fits the model: same feature count, labels below
    /// the class count, indices in range.
    pub(crate) fn check_data(&self, data: &Dataset, indices: &[usize]) -> Result<()> {
        if data.n_features() != self.arch.inputs() {
            return Err(Error::Data {
                origin: "data set",
                line: None,
                detail: format!(
                    "samples have {} features, model {} expects {}",
                    data.n_features(),
                    self.arch.name(),
                    self.arch.inputs()
                ),
            });
        }
        if data.classes() > self.arch.classes() {
            return Err(Error::Data {
                origin: "data set",
                line: None,
                detail: format!(
                    "label {} is out of range for model {} with {} classes",
                    data.classes() - 1,
                    self.arch.name(),
                    self.arch.classes()
                ),
            });
        }
        data.check_indices(indices)
    }

    /// Runs local SGD from `params` over the samples of `data` at
    /// `indices` and returns the update.
    ///
    /// Each epoch visits the samples in an order shuffled by `seed` and
    /// steps on batches of `config.batch_size` (the last may be smaller),
    /// minimising mean cross-entropy. An empty `indices` returns a zero
    /// update with zero samples. Diverging to non-finite parameters is an
    /// error (lower the learning rate).
    pub fn train(
        &self,
        params: &[f32],
        data: &Dataset,
        indices: &[usize],
        config: &TrainConfig,
        seed: u64,
    ) -> Result<LocalUpdate> {
        self.train_with_progress(params, data, indices, config, seed, |_| {})
    }

    /// [`train`](Self::train), calling `progress` after every SGD step so a
    /// caller can draw a progress bar. The result does not depend on it.
    pub fn train_with_progress(
        &self,
        params: &[f32],
        data: &Dataset,
        indices: &[usize],
        config: &TrainConfig,
        seed: u64,
        mut progress: impl FnMut(Progress),
    ) -> Result<LocalUpdate> {
        config.validate()?;
        self.descriptor.check_params(params)?;
        self.check_data(data, indices)?;
        if indices.is_empty() {
            return Ok(LocalUpdate {
                delta: vec![0.0; params.len()],
                samples: 0,
                steps: 0,
                mean_loss: 0.0,
            });
        }
        let device = self.device.clone().autodiff();
        let mut net = Network::from_params(&self.arch, params, &device)?;
        let mut sgd = SgdConfig::new();
        if let Some(m) = config.momentum {
            sgd = sgd.with_momentum(Some(
                MomentumConfig::new().with_momentum(m).with_dampening(0.0),
            ));
        }
        let mut optim = sgd.init();
        let mut rng = SeededRng::seed_from_u64(seed);
        let mut order = indices.to_vec();
        let n_features = data.n_features();
        let classes = self.arch.classes();
        let mut steps: u64 = 0;
        let total_steps =
            indices.len().div_ceil(config.batch_size) as u64 * u64::from(config.epochs);
        let mut loss_sum = 0.0f64;
        for _ in 0..config.epochs {
            crate::split::shuffle(&mut order, &mut rng);
            for batch in order.chunks(config.batch_size) {
                let (x, y) = batch_tensors(data, batch, n_features, classes, &device);
                let loss = cross_entropy(net.forward(x), y, batch.len());
                loss_sum += f64::from(to_vec(loss.clone())?.first().copied().unwrap_or(f32::NAN));
                let grads = GradientsParams::from_grads(loss.backward(), &net);
                net = optim.step(config.learning_rate, net, grads);
                steps += 1;
                progress(Progress {
                    step: steps,
                    total_steps,
                    mean_loss: loss_sum / steps as f64,
                });
            }
        }
        let trained = net.to_params()?;
        let delta: Vec<f32> = trained.iter().zip(params).map(|(n, o)| n - o).collect();
        if let Some(i) = delta.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "learning rate",
                format!(
                    "training diverged (parameter {i} became non-finite); \
                     lower the learning rate"
                ),
            ));
        }
        Ok(LocalUpdate {
            delta,
            samples: indices.len() as u64,
            steps,
            mean_loss: loss_sum / steps as f64,
        })
    }

    /// Accuracy and mean cross-entropy of the model `params` on all of
    /// `data`. An empty data set is an error.
    pub fn evaluate(&self, params: &[f32], data: &Dataset) -> Result<Evaluation> {
        self.descriptor.check_params(params)?;
        self.check_data(data, &[])?;
        if data.is_empty() {
            return Err(Error::Empty {
                what: "evaluation samples",
            });
        }
        let device = self.device.clone().without_autodiff();
        let net = Network::from_params(&self.arch, params, &device)?;
        let classes = self.arch.classes();
        let n_features = data.n_features();
        let mut correct = 0u64;
        let mut loss_sum = 0.0f64;
        for start in (0..data.len()).step_by(EVAL_BATCH) {
            let end = (start + EVAL_BATCH).min(data.len());
            let rows = end - start;
            let x = Tensor::<2>::from_data(
                TensorData::new(
                    data.features()[start * n_features..end * n_features].to_vec(),
                    [rows, n_features],
                ),
                &device,
            );
            let logits = to_vec(net.forward(x))?;
            for (row, &label) in logits.chunks_exact(classes).zip(&data.labels()[start..end]) {
                // Log-softmax in f64 on the host: exact enough and cheap
                // next to the forward pass.
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let log_z = f64::from(max)
                    + row
                        .iter()
                        .map(|&v| f64::from(v - max).exp())
                        .sum::<f64>()
                        .ln();
                loss_sum += log_z - f64::from(row[label as usize]);
                // Ties go to the lowest class, so the result is well defined.
                let best = row
                    .iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                        if v > bv { (i, v) } else { (bi, bv) }
                    })
                    .0;
                if best == label as usize {
                    correct += 1;
                }
            }
        }
        let n = data.len() as f64;
        Ok(Evaluation {
            accuracy: correct as f64 / n,
            loss: loss_sum / n,
            samples: data.len() as u64,
        })
    }
}

/// The features `[batch, features]` and one-hot labels `[batch, classes]`
/// of the samples at `batch`.
fn batch_tensors(
    data: &Dataset,
    batch: &[usize],
    n_features: usize,
    classes: usize,
    device: &Device,
) -> (Tensor<2>, Tensor<2>) {
    let mut x = Vec::with_capacity(batch.len() * n_features);
    let mut y = vec![0f32; batch.len() * classes];
    for (row, &i) in batch.iter().enumerate() {
        // Indices and labels were checked against the data and model.
        x.extend_from_slice(&data.features()[i * n_features..(i + 1) * n_features]);
        y[row * classes + data.labels()[i] as usize] = 1.0;
    }
    (
        Tensor::from_data(TensorData::new(x, [batch.len(), n_features]), device),
        Tensor::from_data(TensorData::new(y, [batch.len(), classes]), device),
    )
}

/// Mean cross-entropy of `logits` against one-hot `targets`, as a
/// one-element tensor.
fn cross_entropy(logits: Tensor<2>, targets: Tensor<2>, batch: usize) -> Tensor<1> {
    log_softmax(logits, 1)
        .mul(targets)
        .sum()
        .neg()
        .div_scalar(batch as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::digits;
    use crate::model::ModelId;

    fn small_digits() -> (Dataset, Dataset) {
        let d = digits().expect("digits");
        let (train, test) = d.split(0.2, 1).expect("split");
        (
            train.subset(&(0..400).collect::<Vec<_>>()).expect("train"),
            test.subset(&(0..200).collect::<Vec<_>>()).expect("test"),
        )
    }

    #[test]
    fn training_reduces_loss_on_digits() {
        let (train, test) = small_digits();
        let arch = Architecture::logistic_regression(64, 10);
        let trainer = Trainer::new(arch.clone(), Compute::Cpu).expect("trainer");
        let params = arch.init_params(5).expect("init");
        let before = trainer.evaluate(&params, &test).expect("eval");
        let config = TrainConfig::sgd(0.5, 2, 16);
        let update = trainer
            .train(&params, &train, &train.all_indices(), &config, 11)
            .expect("train");
        assert_eq!(update.samples, 400);
        assert_eq!(update.steps, 2 * 25);
        let mut seen = Vec::new();
        let again = trainer
            .train_with_progress(&params, &train, &train.all_indices(), &config, 11, |p| {
                seen.push((p.step, p.total_steps))
            })
            .expect("train");
        assert_eq!(again, update);
        assert_eq!(seen.len(), 50);
        assert_eq!(seen.last(), Some(&(50, 50)));
        let trained: Vec<f32> = params
            .iter()
            .zip(&update.delta)
            .map(|(p, d)| p + d)
            .collect();
        let after = trainer.evaluate(&trained, &test).expect("eval");
        assert!(
            after.loss < before.loss * 0.6,
            "loss {} -> {}",
            before.loss,
            after.loss
        );
        assert!(after.accuracy > 0.8, "accuracy {}", after.accuracy);
    }

    #[test]
    fn training_is_deterministic() {
        let (train, _) = small_digits();
        let arch = Architecture::Mlp {
            inputs: 64,
            hidden: vec![16],
            classes: 10,
        };
        let trainer = Trainer::new(arch.clone(), Compute::Cpu).expect("trainer");
        let params = arch.init_params(1).expect("init");
        let idx: Vec<usize> = (0..100).collect();
        let config = TrainConfig {
            momentum: Some(0.9),
            ..TrainConfig::sgd(0.05, 1, 10)
        };
        let run = |seed| {
            let u = trainer
                .train(&params, &train, &idx, &config, seed)
                .expect("train");
            let p: Vec<f32> = params.iter().zip(&u.delta).map(|(p, d)| p + d).collect();
            ModelId::compute(trainer.descriptor(), &p).expect("id")
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn cnn_trains_a_step() {
        let (train, _) = small_digits();
        let arch = Architecture::Cnn {
            channels: 1,
            side: 8,
            conv: [2, 2],
            hidden: 4,
            classes: 10,
        };
        let trainer = Trainer::new(arch.clone(), Compute::Cpu).expect("trainer");
        let params = arch.init_params(2).expect("init");
        let u = trainer
            .train(
                &params,
                &train,
                &[0, 1, 2, 3],
                &TrainConfig::sgd(0.1, 1, 4),
                0,
            )
            .expect("train");
        assert_eq!((u.samples, u.steps), (4, 1));
        assert!(u.delta.iter().any(|&d| d != 0.0));
    }

    #[test]
    fn bad_inputs_are_refused() {
        let (train, _) = small_digits();
        let arch = Architecture::logistic_regression(64, 10);
        let trainer = Trainer::new(arch.clone(), Compute::Cpu).expect("trainer");
        let params = arch.init_params(0).expect("init");
        let ok = TrainConfig::sgd(0.1, 1, 8);
        for bad in [
            TrainConfig::sgd(0.0, 1, 8),
            TrainConfig::sgd(f64::NAN, 1, 8),
            TrainConfig::sgd(0.1, 0, 8),
            TrainConfig::sgd(0.1, 1, 0),
            TrainConfig {
                momentum: Some(1.0),
                ..ok
            },
        ] {
            assert!(
                trainer.train(&params, &train, &[0], &bad, 0).is_err(),
                "{bad:?}"
            );
        }
        assert!(trainer.train(&params[1..], &train, &[0], &ok, 0).is_err());
        assert!(trainer.train(&params, &train, &[400], &ok, 0).is_err());
        let narrow =
            Trainer::new(Architecture::logistic_regression(64, 5), Compute::Cpu).expect("trainer");
        let p5 = Architecture::logistic_regression(64, 5)
            .init_params(0)
            .expect("p");
        let e = narrow.train(&p5, &train, &[0], &ok, 0).expect_err("labels");
        assert_eq!(e.kind(), crate::ErrorKind::InvalidData);
        let wide =
            Trainer::new(Architecture::logistic_regression(65, 10), Compute::Cpu).expect("trainer");
        let p65 = Architecture::logistic_regression(65, 10)
            .init_params(0)
            .expect("p");
        assert!(wide.evaluate(&p65, &train).is_err());
        let empty = trainer.train(&params, &train, &[], &ok, 0).expect("empty");
        assert_eq!(empty.samples, 0);
        assert!(empty.delta.iter().all(|&d| d == 0.0));
    }
}
