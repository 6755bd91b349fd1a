//! The model architectures a job can train, as `burn` modules, and their
//! conversion to and from the flat parameter vectors the rest of the crate
//! works on.
//!
//! An [`Architecture`] is the part of a job spec that names the model. From
//! it come the [`ArchitectureDescriptor`] (and so the model id), a seeded
//! initial parameter vector, and a [`Network`], the `burn` module that runs
//! forward and backward passes.
//!
//! # Flat parameter order
//!
//! The flat vector lists the descriptor's layers in order, each tensor
//! row-major (last dimension fastest):
//!
//! 1. for a CNN, per convolution `i` (1-based): `conv{i}.weight` with shape
//!    `[out_channels, in_channels, 5, 5]`, then `conv{i}.bias` `[out_channels]`;
//! 2. per fully connected layer `i`: `fc{i}.weight` with shape
//!    `[inputs, outputs]`, then `fc{i}.bias` `[outputs]`.
//!
//! Fully connected weights are stored input-major, `y = x·W + b`, which is
//! how `burn` holds them (PyTorch stores the transpose); converting costs no
//! copy in either direction. Two nodes agree on a model id only if they agree
//! on this order, so it is part of the descriptor's meaning and must not
//! change without a new descriptor name.
//!
//! Inputs are flat feature vectors; a CNN reads them as `channels × side ×
//! side` images, channel-major then row-major.

use burn::module::{Module, Param};
use burn::tensor::activation::relu;
use burn::tensor::module::{conv2d, linear, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::model::{ArchitectureDescriptor, DType, LayerShape};
use crate::{Error, Result, SeededRng};

/// Most hidden layers an [`Architecture::Mlp`] may have.
pub const MAX_HIDDEN_LAYERS: usize = 16;
/// Largest width (inputs, hidden units, classes, channels, image side)
/// accepted for any one dimension. The descriptor separately caps the total
/// parameter count.
pub const MAX_WIDTH: usize = 1 << 20;
/// Convolution kernel side of [`Architecture::Cnn`] (padding keeps the
/// image size, as in the FedAvg paper's CNN).
pub const CNN_KERNEL: usize = 5;

/// A model family with its sizes, as written in a job spec.
///
/// ```
/// use openagi_learning::models::Architecture;
///
/// let arch: Architecture = serde_json::from_str(
///     r#"{"kind":"mlp","inputs":784,"hidden":[200,200],"classes":10}"#,
/// ).expect("spec");
/// assert_eq!(arch, Architecture::mnist_2nn());
/// assert_eq!(arch.param_count().expect("valid"), 199_210);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Architecture {
    /// Multinomial logistic regression: one fully connected layer, softmax.
    LogisticRegression {
        /// Input features.
        inputs: usize,
        /// Output classes.
        classes: usize,
    },
    /// A multi-layer perceptron with ReLU between fully connected layers.
    Mlp {
        /// Input features.
        inputs: usize,
        /// Width of each hidden layer, input side first (at least one).
        hidden: Vec<usize>,
        /// Output classes.
        classes: usize,
    },
    /// A small CNN in the style of the FedAvg paper: two blocks of 5×5
    /// convolution (same padding), ReLU and 2×2 max pooling, then a ReLU
    /// hidden layer and the output layer.
    Cnn {
        /// Input channels.
        channels: usize,
        /// Image height and width; must be a multiple of 4 (two poolings).
        side: usize,
        /// Output channels of the two convolutions.
        conv: [usize; 2],
        /// Width of the hidden fully connected layer.
        hidden: usize,
        /// Output classes.
        classes: usize,
    },
}

fn check_width(what: &'static str, n: usize) -> Result<()> {
    if n == 0 || n > MAX_WIDTH {
        return Err(Error::invalid(
            what,
            format!("{n} is not in 1..={MAX_WIDTH}"),
        ));
    }
    Ok(())
}

impl Architecture {
    /// Logistic regression over `inputs` features and `classes` classes.
    pub fn logistic_regression(inputs: usize, classes: usize) -> Self {
        Architecture::LogisticRegression { inputs, classes }
    }

    /// The "2NN" of McMahan et al. 2017: 784-200-200-10 with ReLU.
    pub fn mnist_2nn() -> Self {
        Architecture::Mlp {
            inputs: 784,
            hidden: vec![200, 200],
            classes: 10,
        }
    }

    /// The FedAvg paper's MNIST CNN: 1×28×28 input, 32 and 64 channels,
    /// 512 hidden units, 10 classes.
    pub fn mnist_cnn() -> Self {
        Architecture::Cnn {
            channels: 1,
            side: 28,
            conv: [32, 64],
            hidden: 512,
            classes: 10,
        }
    }

    /// Checks every size and that the parameter count fits a descriptor.
    pub fn validate(&self) -> Result<()> {
        self.descriptor().map(|_| ())
    }

    fn check_sizes(&self) -> Result<()> {
        match self {
            Architecture::LogisticRegression { inputs, classes } => {
                check_width("inputs", *inputs)?;
                check_width("classes", *classes)
            }
            Architecture::Mlp {
                inputs,
                hidden,
                classes,
            } => {
                check_width("inputs", *inputs)?;
                check_width("classes", *classes)?;
                if hidden.is_empty() || hidden.len() > MAX_HIDDEN_LAYERS {
                    return Err(Error::invalid(
                        "hidden layers",
                        format!(
                            "{} given, an MLP needs 1..={MAX_HIDDEN_LAYERS} \
                             (use logistic_regression for none)",
                            hidden.len()
                        ),
                    ));
                }
                hidden
                    .iter()
                    .try_for_each(|&h| check_width("hidden layer width", h))
            }
            Architecture::Cnn {
                channels,
                side,
                conv,
                hidden,
                classes,
            } => {
                check_width("channels", *channels)?;
                check_width("image side", *side)?;
                check_width("convolution channels", conv[0])?;
                check_width("convolution channels", conv[1])?;
                check_width("hidden layer width", *hidden)?;
                check_width("classes", *classes)?;
                if side % 4 != 0 {
                    return Err(Error::invalid(
                        "image side",
                        format!("{side} is not a multiple of 4 (the CNN pools twice by 2)"),
                    ));
                }
                Ok(())
            }
        }
    }

    /// Number of input features a sample must have.
    pub fn inputs(&self) -> usize {
        match self {
            Architecture::LogisticRegression { inputs, .. } | Architecture::Mlp { inputs, .. } => {
                *inputs
            }
            Architecture::Cnn { channels, side, .. } => {
                channels.saturating_mul(side.saturating_mul(*side))
            }
        }
    }

    /// Number of output classes.
    pub fn classes(&self) -> usize {
        match self {
            Architecture::LogisticRegression { classes, .. }
            | Architecture::Mlp { classes, .. }
            | Architecture::Cnn { classes, .. } => *classes,
        }
    }

    /// The `(inputs, outputs)` of each fully connected layer, in order.
    fn dense_sizes(&self) -> Vec<(usize, usize)> {
        match self {
            Architecture::LogisticRegression { inputs, classes } => vec![(*inputs, *classes)],
            Architecture::Mlp {
                inputs,
                hidden,
                classes,
            } => {
                let mut widths = Vec::with_capacity(hidden.len() + 2);
                widths.push(*inputs);
                widths.extend_from_slice(hidden);
                widths.push(*classes);
                widths.windows(2).map(|w| (w[0], w[1])).collect()
            }
            Architecture::Cnn {
                side,
                conv,
                hidden,
                classes,
                ..
            } => {
                let pooled = side / 4;
                let flat = conv[1].saturating_mul(pooled.saturating_mul(pooled));
                vec![(flat, *hidden), (*hidden, *classes)]
            }
        }
    }

    /// The `(in_channels, out_channels)` of each convolution, in order.
    fn conv_sizes(&self) -> Vec<(usize, usize)> {
        match self {
            Architecture::Cnn { channels, conv, .. } => {
                vec![(*channels, conv[0]), (conv[0], conv[1])]
            }
            _ => Vec::new(),
        }
    }

    /// `(channels, side)` of the input image, for a CNN.
    fn image(&self) -> Option<(usize, usize)> {
        match self {
            Architecture::Cnn { channels, side, .. } => Some((*channels, *side)),
            _ => None,
        }
    }

    /// The kind, as a job spec's `kind` names it: `"logistic_regression"`,
    /// `"mlp"` or `"cnn"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Architecture::LogisticRegression { .. } => "logistic_regression",
            Architecture::Mlp { .. } => "mlp",
            Architecture::Cnn { .. } => "cnn",
        }
    }

    /// A short stable name, e.g. `"mlp-784-200-200-10"`,
    /// `"logreg-64-10"` or `"cnn-1x28x28-32-64-512-10"`.
    pub fn name(&self) -> String {
        match self {
            Architecture::LogisticRegression { inputs, classes } => {
                format!("logreg-{inputs}-{classes}")
            }
            Architecture::Mlp {
                inputs,
                hidden,
                classes,
            } => {
                let mid: Vec<String> = hidden.iter().map(usize::to_string).collect();
                format!("mlp-{inputs}-{}-{classes}", mid.join("-"))
            }
            Architecture::Cnn {
                channels,
                side,
                conv,
                hidden,
                classes,
            } => format!(
                "cnn-{channels}x{side}x{side}-{}-{}-{hidden}-{classes}",
                conv[0], conv[1]
            ),
        }
    }

    /// The descriptor: [`name`](Self::name) and the layers in the flat
    /// order documented in the [module docs](self).
    pub fn descriptor(&self) -> Result<ArchitectureDescriptor> {
        self.check_sizes()?;
        let d = |n: usize| n as u64;
        let mut layers = Vec::new();
        for (i, (cin, cout)) in self.conv_sizes().into_iter().enumerate() {
            let k = d(CNN_KERNEL);
            layers.push(LayerShape::new(
                format!("conv{}.weight", i + 1),
                [d(cout), d(cin), k, k],
            ));
            layers.push(LayerShape::new(format!("conv{}.bias", i + 1), [d(cout)]));
        }
        for (i, (fin, fout)) in self.dense_sizes().into_iter().enumerate() {
            layers.push(LayerShape::new(
                format!("fc{}.weight", i + 1),
                [d(fin), d(fout)],
            ));
            layers.push(LayerShape::new(format!("fc{}.bias", i + 1), [d(fout)]));
        }
        ArchitectureDescriptor::new(self.name(), layers, DType::F32)
    }

    /// Total number of parameters.
    pub fn param_count(&self) -> Result<usize> {
        Ok(self.descriptor()?.param_count())
    }

    /// A deterministic initial parameter vector for `seed`.
    ///
    /// Every tensor (weights and biases) is drawn uniformly from
    /// `[-1/√fan_in, 1/√fan_in]`, the default of common frameworks, where
    /// `fan_in` is a layer's inputs (times the kernel area for a
    /// convolution). The draws come from the crate's ChaCha20 stream, not
    /// from the backend's RNG, so every node derives the same initial model
    /// (and model id) from a job's seed whatever backend it runs.
    pub fn init_params(&self, seed: u64) -> Result<Vec<f32>> {
        let descriptor = self.descriptor()?;
        let mut rng = SeededRng::seed_from_u64(seed);
        let mut params = Vec::with_capacity(descriptor.param_count());
        let mut push = |count: usize, fan_in: usize, rng: &mut SeededRng| {
            let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
            for _ in 0..count {
                // 53 random bits → [0, 1), then to [-bound, bound).
                let u = (rand::RngCore::next_u64(rng) >> 11) as f64 * f64::powi(2.0, -53);
                params.push(((2.0 * u - 1.0) * bound) as f32);
            }
        };
        let area = CNN_KERNEL * CNN_KERNEL;
        for (cin, cout) in self.conv_sizes() {
            push(cout * cin * area, cin * area, &mut rng);
            push(cout, cin * area, &mut rng);
        }
        for (fin, fout) in self.dense_sizes() {
            push(fin * fout, fin, &mut rng);
            push(fout, fin, &mut rng);
        }
        debug_assert_eq!(params.len(), descriptor.param_count());
        Ok(params)
    }
}

/// One fully connected layer, `y = x·W + b`.
#[derive(Module, Debug)]
pub struct Dense {
    /// Weight `[inputs, outputs]`.
    pub weight: Param<Tensor<2>>,
    /// Bias `[outputs]`.
    pub bias: Param<Tensor<1>>,
}

/// One 5×5 convolution with same padding (followed in the forward pass by
/// ReLU and 2×2 max pooling).
#[derive(Module, Debug)]
pub struct ConvBlock {
    /// Kernel `[out_channels, in_channels, 5, 5]`.
    pub weight: Param<Tensor<4>>,
    /// Bias `[out_channels]`.
    pub bias: Param<Tensor<1>>,
}

/// The `burn` module for any [`Architecture`]: optional convolution blocks,
/// then fully connected layers with ReLU between them. The output is logits.
#[derive(Module, Debug)]
pub struct Network {
    /// Convolution blocks, input side first (empty unless a CNN).
    pub convs: Vec<ConvBlock>,
    /// Fully connected layers, input side first.
    pub dense: Vec<Dense>,
    /// Input channels of an image model; 0 for flat inputs.
    pub channels: usize,
    /// Input image side of an image model; 0 for flat inputs.
    pub side: usize,
}

fn tensor_from<const D: usize>(values: &[f32], shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

/// Reads a tensor back to the host as `f32`.
pub(crate) fn to_vec<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.try_into_data()
        .map_err(Error::backend)?
        .try_into_vec::<f32>()
        .map_err(|e| Error::backend(format!("{e:?}")))
}

impl Network {
    /// Builds the module for `arch` on `device` from a flat parameter
    /// vector, checking it against the descriptor first (length, finite
    /// values). Parameters created on an autodiff device are trainable.
    pub fn from_params(arch: &Architecture, params: &[f32], device: &Device) -> Result<Self> {
        let descriptor = arch.descriptor()?;
        descriptor.check_params(params)?;
        let mut rest = params;
        // Lengths were checked above, so these splits stay in bounds.
        let mut take = |n: usize| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head
        };
        let k = CNN_KERNEL;
        let convs = arch
            .conv_sizes()
            .into_iter()
            .map(|(cin, cout)| ConvBlock {
                weight: Param::from_tensor(tensor_from(
                    take(cout * cin * k * k),
                    [cout, cin, k, k],
                    device,
                )),
                bias: Param::from_tensor(tensor_from(take(cout), [cout], device)),
            })
            .collect();
        let dense = arch
            .dense_sizes()
            .into_iter()
            .map(|(fin, fout)| Dense {
                weight: Param::from_tensor(tensor_from(take(fin * fout), [fin, fout], device)),
                bias: Param::from_tensor(tensor_from(take(fout), [fout], device)),
            })
            .collect();
        let (channels, side) = arch.image().unwrap_or((0, 0));
        Ok(Network {
            convs,
            dense,
            channels,
            side,
        })
    }

    /// The parameters as one flat vector in the documented order.
    pub fn to_params(&self) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for c in &self.convs {
            out.extend(to_vec(c.weight.val())?);
            out.extend(to_vec(c.bias.val())?);
        }
        for d in &self.dense {
            out.extend(to_vec(d.weight.val())?);
            out.extend(to_vec(d.bias.val())?);
        }
        Ok(out)
    }

    /// Logits `[batch, classes]` for inputs `[batch, features]`.
    ///
    /// The caller guarantees `features` matches the architecture (the
    /// training and evaluation functions check it); a mismatch is a
    /// programming error and the backend panics on it.
    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        let mut x = input;
        if !self.convs.is_empty() {
            let [batch, _] = x.dims();
            let mut y: Tensor<4> = x.reshape([batch, self.channels, self.side, self.side]);
            let pad = CNN_KERNEL / 2;
            for c in &self.convs {
                y = conv2d(
                    y,
                    c.weight.val(),
                    Some(c.bias.val()),
                    ConvOptions::new([1, 1], [pad, pad], [1, 1], 1),
                );
                y = max_pool2d(relu(y), MaxPoolOptions::new([2, 2]));
            }
            x = y.flatten(1, 3);
        }
        let last = self.dense.len().saturating_sub(1);
        for (i, d) in self.dense.iter().enumerate() {
            x = linear(x, d.weight.val(), Some(d.bias.val()));
            if i < last {
                x = relu(x);
            }
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Vec<Architecture> {
        vec![
            Architecture::logistic_regression(64, 10),
            Architecture::Mlp {
                inputs: 64,
                hidden: vec![8, 6],
                classes: 10,
            },
            Architecture::Cnn {
                channels: 1,
                side: 8,
                conv: [2, 3],
                hidden: 5,
                classes: 10,
            },
        ]
    }

    #[test]
    fn descriptor_matches_param_count() {
        assert_eq!(
            Architecture::mnist_2nn().param_count().expect("2nn"),
            199_210
        );
        assert_eq!(
            Architecture::logistic_regression(784, 10)
                .param_count()
                .expect("lr"),
            7_850
        );
        // 32·1·25+32 + 64·32·25+64 + 3136·512+512 + 512·10+10: the
        // FedAvg paper's CNN.
        assert_eq!(
            Architecture::mnist_cnn().param_count().expect("cnn"),
            1_663_370
        );
        let device = Device::flex();
        for arch in small() {
            let d = arch.descriptor().expect("descriptor");
            let params = arch.init_params(7).expect("init");
            assert_eq!(params.len(), d.param_count(), "{}", arch.name());
            let net = Network::from_params(&arch, &params, &device).expect("net");
            let count: usize = net.num_params();
            assert_eq!(count, d.param_count(), "{}", arch.name());
        }
    }

    #[test]
    fn flatten_round_trip() {
        let device = Device::flex();
        for arch in small() {
            let params = arch.init_params(3).expect("init");
            let net = Network::from_params(&arch, &params, &device).expect("net");
            assert_eq!(net.to_params().expect("flat"), params, "{}", arch.name());
            // Layer by layer, the ranges of the descriptor are what the
            // module holds.
            let d = arch.descriptor().expect("d");
            let ranges = d.layer_ranges();
            let first = &ranges[0];
            let w0 = if let Some(c) = net.convs.first() {
                to_vec(c.weight.val()).expect("w")
            } else {
                to_vec(net.dense[0].weight.val()).expect("w")
            };
            assert_eq!(w0, params[first.1.clone()]);
            let out = net.forward(Tensor::zeros([3, arch.inputs()], &device));
            assert_eq!(out.dims(), [3, 10]);
        }
    }

    #[test]
    fn init_is_seeded_and_bounded() {
        let arch = Architecture::logistic_regression(64, 10);
        let a = arch.init_params(1).expect("a");
        assert_eq!(a, arch.init_params(1).expect("again"));
        assert_ne!(a, arch.init_params(2).expect("other"));
        assert!(a.iter().all(|v| v.abs() <= 1.0 / 8.0));
    }

    #[test]
    fn bad_sizes_and_params_are_refused() {
        assert!(Architecture::logistic_regression(0, 10).validate().is_err());
        let no_hidden = Architecture::Mlp {
            inputs: 4,
            hidden: vec![],
            classes: 2,
        };
        assert!(no_hidden.validate().is_err());
        let odd = Architecture::Cnn {
            channels: 1,
            side: 6,
            conv: [1, 1],
            hidden: 1,
            classes: 2,
        };
        assert!(odd.validate().is_err());
        let arch = Architecture::logistic_regression(4, 2);
        let device = Device::flex();
        assert!(Network::from_params(&arch, &[0.0; 9], &device).is_err());
        let mut nan = vec![0.0; 10];
        nan[3] = f32::NAN;
        assert!(Network::from_params(&arch, &nan, &device).is_err());
        let json = r#"{"kind":"cnn","channels":1,"side":8,"conv":[2,3],"hidden":5,"classes":10}"#;
        let parsed: Architecture = serde_json::from_str(json).expect("cnn spec");
        assert_eq!(parsed, small()[2]);
        assert!(serde_json::from_str::<Architecture>(r#"{"kind":"rnn","inputs":1}"#).is_err());
    }
}
