//! Labelled data sets held in memory, the embedded 8×8 digits set, and
//! parsers for the formats researchers bring: CSV and MNIST's IDX.
//!
//! The parsers take bytes or a [`Read`]er; opening files is the node's job.
//! Both accept gzip-compressed input (recognised by its magic bytes) and
//! bound everything they allocate, so a hostile or truncated file ends in an
//! [`Error::Data`] naming what is wrong (and, for CSV, the line), never in a
//! panic or an unbounded allocation.
//!
//! Use [`crate::split`] to partition a [`Dataset`] across simulated clients
//! and [`Dataset::split`] for a seeded train/test split.

use std::io::{BufRead, BufReader, Read};

use rand::SeedableRng;

use crate::{Error, Result, SeededRng};

/// The embedded digits set: gzip-compressed CSV, 64 features then the label.
const DIGITS_CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// Samples in the embedded digits set.
pub const DIGITS_SAMPLES: usize = 1797;
/// Features per digits sample (8×8 pixels).
pub const DIGITS_FEATURES: usize = 64;
/// Largest raw pixel value in the digits set; [`digits`] divides by it.
pub const DIGITS_MAX_VALUE: f32 = 16.0;

/// gzip's two magic bytes.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Largest label accepted by any loader; far above any real class count,
/// low enough that one-hot buffers stay small.
pub const MAX_LABEL: u32 = 65_535;

/// The shape of a data set (no samples): enough to tell whether it fits a
/// model, and what a node tells a job it joins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataProfile {
    /// Number of samples.
    pub samples: usize,
    /// Features per sample.
    pub features: usize,
    /// Classes the labels span (the largest label plus one).
    pub classes: usize,
}

/// A labelled data set: `len` samples of `features` `f32` values each,
/// stored row-major, and one label per sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    features: Vec<f32>,
    labels: Vec<u32>,
    n_features: usize,
}

impl Dataset {
    /// Builds a data set from row-major features and labels, checking that
    /// the sizes agree, every feature is finite and every label is at most
    /// [`MAX_LABEL`].
    pub fn new(features: Vec<f32>, labels: Vec<u32>, n_features: usize) -> Result<Self> {
        if n_features == 0 {
            return Err(Error::data(
                "data set",
                "samples must have at least one feature",
            ));
        }
        let expected = labels
            .len()
            .checked_mul(n_features)
            .ok_or_else(|| Error::data("data set", "sample count times feature count overflows"))?;
        if features.len() != expected {
            return Err(Error::data(
                "data set",
                format!(
                    "{} labels of {n_features} features need {expected} values, got {}",
                    labels.len(),
                    features.len()
                ),
            ));
        }
        if let Some(i) = features.iter().position(|v| !v.is_finite()) {
            return Err(Error::data(
                "data set",
                format!(
                    "sample {} feature {} is not finite",
                    i / n_features,
                    i % n_features
                ),
            ));
        }
        if let Some(i) = labels.iter().position(|&l| l > MAX_LABEL) {
            return Err(Error::data(
                "data set",
                format!("sample {i} has label {} > {MAX_LABEL}", labels[i]),
            ));
        }
        Ok(Dataset {
            features,
            labels,
            n_features,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features per sample.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// Number of classes the labels span: the largest label plus one (0 for
    /// an empty set).
    pub fn classes(&self) -> usize {
        self.labels.iter().max().map_or(0, |&l| l as usize + 1)
    }

    /// The data set's shape: what decides whether it fits a model.
    pub fn profile(&self) -> DataProfile {
        DataProfile {
            samples: self.len(),
            features: self.n_features,
            classes: self.classes(),
        }
    }

    /// All features, row-major.
    pub fn features(&self) -> &[f32] {
        &self.features
    }

    /// All labels.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// One sample's features and label.
    pub fn sample(&self, i: usize) -> Option<(&[f32], u32)> {
        let label = *self.labels.get(i)?;
        let start = i * self.n_features;
        Some((self.features.get(start..start + self.n_features)?, label))
    }

    /// The indices `0..len`, for functions that take a subset by index.
    pub fn all_indices(&self) -> Vec<usize> {
        (0..self.len()).collect()
    }

    /// Checks that every index is in range.
    pub fn check_indices(&self, indices: &[usize]) -> Result<()> {
        match indices.iter().find(|&&i| i >= self.len()) {
            Some(&i) => Err(Error::invalid(
                "sample index",
                format!("{i} is out of range for {} samples", self.len()),
            )),
            None => Ok(()),
        }
    }

    /// A new data set of the samples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset> {
        self.check_indices(indices)?;
        let mut features = Vec::with_capacity(indices.len() * self.n_features);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let start = i * self.n_features;
            features.extend_from_slice(&self.features[start..start + self.n_features]);
            labels.push(self.labels[i]);
        }
        Ok(Dataset {
            features,
            labels,
            n_features: self.n_features,
        })
    }

    /// A seeded train/test split: the samples are shuffled by `seed` and
    /// the first `round(test_fraction · len)` become the test set. Both
    /// parts keep the shuffled order.
    pub fn split(&self, test_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(0.0..=1.0).contains(&test_fraction) {
            return Err(Error::invalid(
                "test fraction",
                format!("{test_fraction} is not in [0, 1]"),
            ));
        }
        let mut order = self.all_indices();
        crate::split::shuffle(&mut order, &mut SeededRng::seed_from_u64(seed));
        let n_test = ((test_fraction * self.len() as f64).round() as usize).min(self.len());
        let (test, train) = order.split_at(n_test);
        Ok((self.subset(train)?, self.subset(test)?))
    }

    /// Multiplies every feature by `factor` (e.g. `1/255` for 8-bit
    /// pixels), refusing a factor that is not finite or a result that
    /// overflows.
    pub fn scaled(mut self, factor: f32) -> Result<Self> {
        if !factor.is_finite() {
            return Err(Error::invalid(
                "scale factor",
                format!("{factor} is not finite"),
            ));
        }
        for v in &mut self.features {
            *v *= factor;
            if !v.is_finite() {
                return Err(Error::invalid(
                    "scale factor",
                    format!("{factor} makes a feature overflow"),
                ));
            }
        }
        Ok(self)
    }

    /// How many samples carry each label `0..classes()`.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes()];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }
}

/// The embedded 8×8 digits set (1797 samples, 64 features, labels 0..9)
/// with features scaled to `[0, 1]`, in file order.
///
/// This is scikit-learn's copy of the UCI "Optical Recognition of
/// Handwritten Digits" set (BSD-3-Clause; the UCI data is CC BY 4.0; see
/// `learning/data/README.md`).
pub fn digits() -> Result<Dataset> {
    let options = CsvOptions {
        max_samples: DIGITS_SAMPLES,
        ..CsvOptions::default()
    };
    let raw = parse_csv(DIGITS_CSV_GZ, &options)?;
    if raw.len() != DIGITS_SAMPLES || raw.n_features() != DIGITS_FEATURES {
        return Err(Error::data(
            "embedded digits",
            format!("{} samples of {} features", raw.len(), raw.n_features()),
        ));
    }
    raw.scaled(1.0 / DIGITS_MAX_VALUE)
}

/// Limits and layout for [`parse_csv`].
#[derive(Clone, Debug, PartialEq)]
pub struct CsvOptions {
    /// Skip the first line.
    pub header: bool,
    /// Most samples read; more is an error.
    pub max_samples: usize,
    /// Most features per sample; more is an error.
    pub max_features: usize,
    /// Longest line in bytes.
    pub max_line_bytes: usize,
    /// Most (decompressed) bytes read in all.
    pub max_total_bytes: u64,
}

impl Default for CsvOptions {
    /// No header, at most 10 million samples of at most 100,000 features,
    /// lines up to 4 MiB, 2 GiB in all.
    fn default() -> Self {
        CsvOptions {
            header: false,
            max_samples: 10_000_000,
            max_features: 100_000,
            max_line_bytes: 4 << 20,
            max_total_bytes: 2 << 30,
        }
    }
}

/// Wraps `input` in a gzip decoder if it starts with gzip's magic bytes,
/// and bounds what can be read from it to `limit` bytes (plus one, so the
/// caller can tell "exactly at the limit" from "over it").
fn maybe_gunzip<'a, R: Read + 'a>(input: R, limit: u64) -> Result<Box<dyn BufRead + 'a>> {
    let mut buffered = BufReader::new(input);
    let head = buffered
        .fill_buf()
        .map_err(|e| Error::data("input", format!("read failed: {e}")))?;
    let reader: Box<dyn Read + 'a> = if head.starts_with(&GZIP_MAGIC) {
        // Multi-member aware: concatenated gzip files are valid gzip.
        Box::new(flate2::read::MultiGzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };
    Ok(Box::new(BufReader::new(
        reader.take(limit.saturating_add(1)),
    )))
}

/// Parses CSV (optionally gzip-compressed): one sample a line, its features
/// as decimal numbers, then its label as a non-negative integer, separated
/// by commas. Blank lines (and a trailing newline) are ignored; spaces
/// around fields and `\r\n` line ends are accepted. Every line must have the
/// same number of fields as the first.
///
/// Features are returned as written; scale them with [`Dataset::scaled`].
/// Errors name the 1-based line and what is wrong with it.
pub fn parse_csv<R: Read>(input: R, options: &CsvOptions) -> Result<Dataset> {
    const ORIGIN: &str = "CSV";
    let mut reader = maybe_gunzip(input, options.max_total_bytes)?;
    let mut line = Vec::new();
    let mut features = Vec::new();
    let mut labels = Vec::new();
    let mut n_features: Option<usize> = None;
    let mut total: u64 = 0;
    let mut line_no: u64 = 0;
    loop {
        line.clear();
        let read = (&mut reader)
            .take(options.max_line_bytes as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::data(ORIGIN, format!("read failed: {e}")))?;
        if read == 0 {
            break;
        }
        line_no += 1;
        total += read as u64;
        let at = |detail: String| Error::Data {
            origin: ORIGIN,
            line: Some(line_no),
            detail,
        };
        if total > options.max_total_bytes {
            return Err(at(format!(
                "input exceeds the limit of {} bytes",
                options.max_total_bytes
            )));
        }
        // At most `max_line_bytes + 1` bytes were read: a longer line shows
        // up as more content than the limit, with no newline.
        let content = line.len() - usize::from(line.last() == Some(&b'\n'));
        if content > options.max_line_bytes {
            return Err(at(format!(
                "line longer than the limit of {} bytes",
                options.max_line_bytes
            )));
        }
        if options.header && line_no == 1 {
            continue;
        }
        let text = std::str::from_utf8(&line).map_err(|_| at("not valid UTF-8".into()))?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        if labels.len() >= options.max_samples {
            return Err(at(format!(
                "more than the limit of {} samples",
                options.max_samples
            )));
        }
        let fields: Vec<&str> = text.split(',').map(str::trim).collect();
        let (label_text, feature_texts) = match fields.split_last() {
            Some((l, f)) if !f.is_empty() => (*l, f),
            _ => {
                return Err(at(
                    "needs at least one feature and a label, separated by commas".into(),
                ));
            }
        };
        match n_features {
            None => {
                if feature_texts.len() > options.max_features {
                    return Err(at(format!(
                        "{} features exceed the limit of {}",
                        feature_texts.len(),
                        options.max_features
                    )));
                }
                n_features = Some(feature_texts.len());
            }
            Some(n) if n != feature_texts.len() => {
                return Err(at(format!(
                    "{} fields, but the first sample had {} (features then the label)",
                    fields.len(),
                    n + 1
                )));
            }
            Some(_) => {}
        }
        for (col, f) in feature_texts.iter().enumerate() {
            let v: f32 = f
                .parse()
                .map_err(|_| at(format!("field {} ({f:?}) is not a number", col + 1)))?;
            if !v.is_finite() {
                return Err(at(format!("field {} ({f:?}) is not finite", col + 1)));
            }
            features.push(v);
        }
        let label: u32 = label_text.parse().map_err(|_| {
            at(format!(
                "label {label_text:?} (the last field) is not a non-negative integer"
            ))
        })?;
        if label > MAX_LABEL {
            return Err(at(format!(
                "label {label} exceeds the limit of {MAX_LABEL}"
            )));
        }
        labels.push(label);
    }
    let n_features = n_features.ok_or_else(|| Error::data(ORIGIN, "no samples"))?;
    Dataset::new(features, labels, n_features)
}

/// Limits for [`parse_idx`].
#[derive(Clone, Debug, PartialEq)]
pub struct IdxOptions {
    /// Most samples accepted.
    pub max_samples: usize,
    /// Most values per sample (rows × columns) accepted.
    pub max_features: usize,
}

impl Default for IdxOptions {
    /// Up to 10 million samples of up to 1 million values each, and never
    /// more than 2^31 pixel bytes in all.
    fn default() -> Self {
        IdxOptions {
            max_samples: 10_000_000,
            max_features: 1 << 20,
        }
    }
}

/// Most pixel bytes [`parse_idx`] reads, whatever the options say.
const MAX_IDX_BYTES: usize = 1 << 31;

/// IDX type code for unsigned bytes.
const IDX_U8: u8 = 0x08;

/// Reads an IDX header: two zero bytes, the type code (must be `u8`), the
/// rank, then one big-endian `u32` per dimension.
fn read_idx_header<R: Read>(r: &mut R, origin: &'static str, rank: u8) -> Result<Vec<usize>> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)
        .map_err(|e| Error::data(origin, format!("cannot read the 4-byte magic: {e}")))?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(Error::data(
            origin,
            format!("bad magic {magic:02x?}: an IDX file starts with two zero bytes"),
        ));
    }
    if magic[2] != IDX_U8 {
        return Err(Error::data(
            origin,
            format!(
                "element type 0x{:02x} is not supported (only unsigned bytes, 0x08)",
                magic[2]
            ),
        ));
    }
    if magic[3] != rank {
        return Err(Error::data(
            origin,
            format!("rank {} where {rank} was expected", magic[3]),
        ));
    }
    let mut dims = Vec::with_capacity(rank as usize);
    for i in 0..rank {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)
            .map_err(|e| Error::data(origin, format!("cannot read dimension {i}: {e}")))?;
        let d = u32::from_be_bytes(b) as usize;
        if d == 0 {
            return Err(Error::data(origin, format!("dimension {i} is zero")));
        }
        dims.push(d);
    }
    Ok(dims)
}

/// Reads exactly `len` bytes and checks that nothing follows.
fn read_body<R: Read>(r: &mut R, origin: &'static str, len: usize) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    // `take` bounds the allocation by what the header promised (checked
    // against the limits before calling), not by what the input sends.
    let got = r
        .take(len as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| Error::data(origin, format!("read failed: {e}")))?;
    if got < len {
        return Err(Error::data(
            origin,
            format!("truncated: the header promises {len} data bytes, found {got}"),
        ));
    }
    if got > len {
        return Err(Error::data(
            origin,
            format!("trailing bytes after the {len} data bytes the header promises"),
        ));
    }
    Ok(body)
}

/// Parses an MNIST-style pair of IDX files (each raw or gzip-compressed):
/// `images` of rank 3 (`count × rows × columns` unsigned bytes) and
/// `labels` of rank 1 (`count` unsigned bytes). The counts must agree.
/// Pixels are scaled to `[0, 1]` (divided by 255); each image becomes one
/// sample of `rows · columns` features, row-major.
pub fn parse_idx<I: Read, L: Read>(images: I, labels: L, options: &IdxOptions) -> Result<Dataset> {
    const IMAGES: &str = "IDX images";
    const LABELS: &str = "IDX labels";
    let mut images = maybe_gunzip(images, MAX_IDX_BYTES as u64 + 64)?;
    let mut labels = maybe_gunzip(labels, MAX_IDX_BYTES as u64 + 64)?;
    let dims = read_idx_header(&mut images, IMAGES, 3)?;
    let (count, rows, cols) = (dims[0], dims[1], dims[2]);
    let label_dims = read_idx_header(&mut labels, LABELS, 1)?;
    if label_dims[0] != count {
        return Err(Error::data(
            LABELS,
            format!("{} labels for {count} images", label_dims[0]),
        ));
    }
    if count > options.max_samples {
        return Err(Error::data(
            IMAGES,
            format!("{count} images exceed the limit of {}", options.max_samples),
        ));
    }
    let per_image = rows
        .checked_mul(cols)
        .filter(|&n| n <= options.max_features)
        .ok_or_else(|| {
            Error::data(
                IMAGES,
                format!(
                    "{rows}×{cols} images exceed the limit of {} values",
                    options.max_features
                ),
            )
        })?;
    let total = count
        .checked_mul(per_image)
        .filter(|&n| n <= MAX_IDX_BYTES)
        .ok_or_else(|| {
            Error::data(
                IMAGES,
                format!("{count} images of {per_image} bytes exceed {MAX_IDX_BYTES} bytes"),
            )
        })?;
    let pixels = read_body(&mut images, IMAGES, total)?;
    let label_bytes = read_body(&mut labels, LABELS, count)?;
    let features = pixels.iter().map(|&p| f32::from(p) / 255.0).collect();
    Dataset::new(
        features,
        label_bytes.into_iter().map(u32::from).collect(),
        per_image,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn csv(text: &str) -> Result<Dataset> {
        parse_csv(text.as_bytes(), &CsvOptions::default())
    }

    fn line_of(e: &Error) -> Option<u64> {
        match e {
            Error::Data { line, .. } => *line,
            _ => None,
        }
    }

    #[test]
    fn embedded_digits() {
        let d = digits().expect("digits");
        assert_eq!(d.len(), DIGITS_SAMPLES);
        assert_eq!(d.n_features(), 64);
        assert_eq!(d.classes(), 10);
        // Every class is well represented (the set has 174–183 per class).
        assert!(d.class_counts().iter().all(|&c| (170..=185).contains(&c)));
        assert!(d.features().iter().all(|&v| (0.0..=1.0).contains(&v)));
        // The first sample in the file is a 0.
        let (x, y) = d.sample(0).expect("first");
        assert_eq!(y, 0);
        assert_eq!(x[2], 5.0 / 16.0);
    }

    #[test]
    fn split_is_seeded_and_complete() {
        let d = digits().expect("digits");
        let (train, test) = d.split(0.25, 9).expect("split");
        assert_eq!(test.len(), 449);
        assert_eq!(train.len() + test.len(), d.len());
        let (train2, test2) = d.split(0.25, 9).expect("again");
        assert_eq!((train, test.clone()), (train2, test2));
        let (_, other) = d.split(0.25, 10).expect("other seed");
        assert_ne!(test, other);
        assert!(d.split(1.5, 0).is_err());
    }

    #[test]
    fn csv_parses_and_reports_lines() {
        let d = csv("1, 2.5,0\r\n\n3,4,2\n").expect("valid");
        assert_eq!(d.len(), 2);
        assert_eq!(d.features(), &[1.0, 2.5, 3.0, 4.0]);
        assert_eq!(d.labels(), &[0, 2]);
        let with_header = parse_csv(
            "a,b,label\n1,2,1\n".as_bytes(),
            &CsvOptions {
                header: true,
                ..CsvOptions::default()
            },
        )
        .expect("header");
        assert_eq!(with_header.len(), 1);

        for (text, line, needle) in [
            ("1,2,0\n1,2\n", 2, "2 fields"),
            ("1,2,0\n1,x,0\n", 2, "field 2"),
            ("1,2,0\n\n1,2,-1\n", 3, "label"),
            ("1,2,0.5\n", 1, "label"),
            ("7\n", 1, "at least one feature"),
            ("1,inf,0\n", 1, "not finite"),
            ("1,2,99999999\n", 1, "label"),
        ] {
            let e = csv(text).expect_err(text);
            assert_eq!(e.kind(), ErrorKind::InvalidData, "{text}");
            assert_eq!(line_of(&e), Some(line), "{text}: {e}");
            assert!(e.to_string().contains(needle), "{text}: {e}");
            assert!(e.to_string().contains(&format!("CSV line {line}")), "{e}");
        }
        assert!(csv("").is_err());
        assert!(csv("\n\n").is_err());
        let e = parse_csv(
            "1,2,0\n1,2,0\n1,2,0\n".as_bytes(),
            &CsvOptions {
                max_samples: 2,
                ..CsvOptions::default()
            },
        )
        .expect_err("too many");
        assert_eq!(line_of(&e), Some(3));
        let e = parse_csv(
            "1,2,3,4,5,6,7,8,9,0\n".as_bytes(),
            &CsvOptions {
                max_line_bytes: 8,
                ..CsvOptions::default()
            },
        )
        .expect_err("long line");
        assert!(e.to_string().contains("longer"), "{e}");
        // Exactly at the limit is fine, with or without the newline.
        let at_limit = CsvOptions {
            max_line_bytes: 5,
            ..CsvOptions::default()
        };
        assert_eq!(
            parse_csv("1,2,3\n4,5,6".as_bytes(), &at_limit)
                .expect("ok")
                .len(),
            2
        );
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).expect("write");
        enc.finish().expect("finish")
    }

    fn idx_images(count: u32, rows: u32, cols: u32, body: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, 3];
        for d in [count, rows, cols] {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(body);
        v
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, 1];
        v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
        v.extend_from_slice(labels);
        v
    }

    #[test]
    fn idx_parses_raw_and_gzip() {
        let images = idx_images(2, 2, 2, &[0, 255, 51, 0, 1, 2, 3, 4]);
        let labels = idx_labels(&[7, 1]);
        let opts = IdxOptions::default();
        let d = parse_idx(&images[..], &labels[..], &opts).expect("raw");
        assert_eq!((d.len(), d.n_features()), (2, 4));
        assert_eq!(d.labels(), &[7, 1]);
        assert_eq!(&d.features()[..3], &[0.0, 1.0, 0.2]);
        let z = parse_idx(&gzip(&images)[..], &gzip(&labels)[..], &opts).expect("gz");
        assert_eq!(z, d);
    }

    #[test]
    fn idx_rejects_malformed_input() {
        let opts = IdxOptions::default();
        let good_images = idx_images(2, 2, 2, &[0; 8]);
        let good_labels = idx_labels(&[0, 1]);
        let cases: Vec<(Vec<u8>, Vec<u8>, &str)> = vec![
            (vec![1, 0, 8, 3], good_labels.clone(), "magic"),
            (
                {
                    let mut v = good_images.clone();
                    v[2] = 0x0d;
                    v
                },
                good_labels.clone(),
                "element type",
            ),
            (good_labels.clone(), good_labels.clone(), "rank"),
            (
                idx_images(2, 2, 2, &[0; 7]),
                good_labels.clone(),
                "truncated",
            ),
            (
                idx_images(2, 2, 2, &[0; 9]),
                good_labels.clone(),
                "trailing",
            ),
            (idx_images(2, 0, 2, &[]), good_labels.clone(), "zero"),
            (
                good_images.clone(),
                idx_labels(&[0, 1, 2]),
                "3 labels for 2",
            ),
            (good_images.clone(), vec![0, 0, 8], "magic"),
            (
                idx_images(u32::MAX, 65_535, 65_535, &[]),
                good_labels.clone(),
                "labels",
            ),
        ];
        for (images, labels, needle) in cases {
            let e = parse_idx(&images[..], &labels[..], &opts).expect_err(needle);
            assert_eq!(e.kind(), ErrorKind::InvalidData);
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
        // A huge promised size is refused before anything is allocated.
        let huge = idx_images(1_000_000, 65_535, 65_535, &[]);
        let mut labels = vec![0, 0, 8, 1];
        labels.extend_from_slice(&1_000_000u32.to_be_bytes());
        let e = parse_idx(&huge[..], &labels[..], &opts).expect_err("huge");
        assert!(e.to_string().contains("exceed"), "{e}");
    }
}
