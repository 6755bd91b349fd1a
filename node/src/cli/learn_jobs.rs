//! `openagi learn submit|status|export|models`: federated jobs and the
//! network's models on a running node, through its local API.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use openagi_learning::federation::JobSpec;

use crate::cli::client::ApiClient;
use crate::common::datadir::DataDir;
use crate::outln;

/// Arguments of `openagi learn submit`.
#[derive(Args, Debug, Clone)]
pub struct SubmitArgs {
    /// The job spec (TOML; see `configs/digits-job.toml`).
    pub job: PathBuf,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `openagi learn status`.
#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// Print the whole document as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `openagi learn export`.
#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// The job id, or any start of it that names one job (`learn status`
    /// prints the first 12 digits).
    #[arg(long)]
    pub job: String,
    /// The round whose resulting model to export (0: the initial model);
    /// the latest by default.
    #[arg(long)]
    pub round: Option<u64>,
    /// Where to write the model: its parameters as little-endian f32, in
    /// the architecture's layer order.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `openagi learn models`.
#[derive(Args, Debug, Clone)]
pub struct ModelsArgs {
    /// Only this job's models (its id or any start of it that names one
    /// job).
    #[arg(long)]
    pub job: Option<String>,
    /// Only the models jobs finished with.
    #[arg(long = "final")]
    pub final_only: bool,
    /// Print the cards as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Reads and validates a job spec file.
pub fn read_job(path: &std::path::Path) -> Result<JobSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let spec: JobSpec = toml::from_str(&text)
        .with_context(|| format!("{} is not a valid job spec", path.display()))?;
    spec.validate()
        .with_context(|| format!("{} is not a valid job spec", path.display()))?;
    Ok(spec)
}

/// `openagi learn submit`.
pub fn submit(dir: &DataDir, args: &SubmitArgs) -> Result<()> {
    let spec = read_job(&args.job)?;
    let client = ApiClient::from_data_dir(dir)?.with_timeout(std::time::Duration::from_secs(60));
    let answer = client.post_json("/api/v1/learn/jobs", &serde_json::to_value(&spec)?)?;
    if args.json {
        outln!("{answer}")?;
    } else {
        outln!(
            "job {} submitted ({}); follow it with `openagi learn status`",
            answer["job_id"].as_str().unwrap_or("?"),
            spec.name
        )?;
    }
    Ok(())
}

/// `openagi learn status`.
pub fn status(dir: &DataDir, args: &StatusArgs) -> Result<()> {
    let answer = ApiClient::from_data_dir(dir)?.get_json("/api/v1/learn/jobs")?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&answer)?)?;
        return Ok(());
    }
    let jobs = answer["jobs"].as_array().cloned().unwrap_or_default();
    if jobs.is_empty() {
        outln!("no learning jobs on this node's ledger")?;
    }
    for job in jobs {
        let j = JobSummary::of(&job, 12);
        outln!(
            "{} {:<16} {:<11} round {}/{}  joined {}{}  accuracy {}  ε {}{}  stragglers {}",
            j.id,
            j.name,
            j.state,
            j.round,
            j.rounds,
            j.joined,
            if j.joined_here {
                " (this node too)"
            } else {
                ""
            },
            j.accuracy,
            j.epsilon.as_deref().unwrap_or("-"),
            match job["privacy_mode"].as_str() {
                Some(mode) if mode != "none" => format!(" ({mode})"),
                _ => String::new(),
            },
            j.stragglers,
        )?;
        if let Some(waiting) = job["waiting_for"].as_str() {
            outln!("    waiting for {waiting}")?;
        }
        if let Some(why) = job["not_joining"].as_str() {
            outln!("    this node does not join: {why}")?;
        }
    }
    Ok(())
}

/// What `learn status` and the devnet summary show of one job from
/// `/api/v1/learn/jobs`, formatted.
pub struct JobSummary {
    /// The job id, shortened.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: String,
    /// The latest finished round.
    pub round: u64,
    /// Rounds asked for.
    pub rounds: u64,
    /// Nodes that joined.
    pub joined: u64,
    /// Whether the answering node joined.
    pub joined_here: bool,
    /// Test accuracy after the latest round (`-` before any).
    pub accuracy: String,
    /// ε after the latest round, with DP.
    pub epsilon: Option<String>,
    /// Stragglers over all rounds.
    pub stragglers: u64,
}

impl JobSummary {
    /// Reads `job`, shortening its id to `id_len` characters.
    pub fn of(job: &serde_json::Value, id_len: usize) -> Self {
        let text = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
        let id = text(&job["job_id"]);
        let history = job["history"].as_array();
        let last = history.and_then(|h| h.last());
        Self {
            id: id.get(..id_len).unwrap_or(&id).to_string(),
            name: text(&job["name"]),
            state: text(&job["state"]),
            round: last.and_then(|l| l["round"].as_u64()).unwrap_or(0),
            rounds: job["rounds"].as_u64().unwrap_or(0),
            joined: job["joined"].as_u64().unwrap_or(0),
            joined_here: job["joined_here"] == true,
            accuracy: last
                .and_then(|l| l["accuracy"].as_f64())
                .map_or("-".into(), |a| format!("{:.1}%", a * 100.0)),
            epsilon: last
                .and_then(|l| l["epsilon"].as_f64())
                .map(|e| format!("{e:.2}")),
            stragglers: history.map_or(0, |h| {
                h.iter().filter_map(|r| r["stragglers"].as_u64()).sum()
            }),
        }
    }
}

/// A job id prefix that names no job, or more than one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobPrefixError {
    /// Not hex digits (or nothing at all).
    #[error("{0:?} is not a job id or the start of one (hex digits)")]
    NotHex(String),
    /// No job id starts with it.
    #[error("no job starts with {0} on this node's ledger (see `openagi learn status`)")]
    NoMatch(String),
    /// Several job ids start with it.
    #[error("{prefix} is ambiguous: {count} jobs start with it ({examples}); give more digits")]
    Ambiguous {
        /// The prefix as given.
        prefix: String,
        /// How many jobs it matches.
        count: usize,
        /// A few of them, shortened.
        examples: String,
    },
}

/// The one id among `ids` that starts with `prefix`: a whole id or the
/// shortened one `learn status` prints. Case and surrounding space do
/// not matter, since people copy ids from terminals and web pages.
pub fn resolve_job_prefix<'a>(
    prefix: &str,
    ids: impl IntoIterator<Item = &'a str>,
) -> Result<&'a str, JobPrefixError> {
    let wanted = prefix.trim().to_ascii_lowercase();
    if wanted.is_empty() || !wanted.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(JobPrefixError::NotHex(prefix.to_string()));
    }
    let matches: Vec<&str> = ids
        .into_iter()
        .filter(|id| id.to_ascii_lowercase().starts_with(&wanted))
        .collect();
    match matches.as_slice() {
        [] => Err(JobPrefixError::NoMatch(wanted)),
        [one] => Ok(one),
        many => {
            // Enough digits to tell the candidates apart, a few of them.
            let shown: Vec<&str> = many
                .iter()
                .take(3)
                .map(|id| id.get(..wanted.len() + 4).unwrap_or(id))
                .collect();
            let more = if many.len() > shown.len() {
                ", …"
            } else {
                ""
            };
            Err(JobPrefixError::Ambiguous {
                count: many.len(),
                examples: format!("{}{more}", shown.join(", ")),
                prefix: wanted,
            })
        }
    }
}

/// The full id of the job `text` names: `text` itself when it is a whole
/// id, otherwise the one job on the daemon's ledger that starts with it.
fn full_job_id(client: &ApiClient, text: &str) -> Result<String> {
    if openagi_learning::federation::JobId::from_hex(text).is_ok() {
        return Ok(text.trim().to_ascii_lowercase());
    }
    let answer = client.get_json("/api/v1/learn/jobs")?;
    let jobs = answer["jobs"].as_array().cloned().unwrap_or_default();
    let ids = jobs.iter().filter_map(|j| j["job_id"].as_str());
    Ok(resolve_job_prefix(text, ids)?.to_string())
}

/// `openagi learn export`.
pub fn export(dir: &DataDir, args: &ExportArgs) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?.with_timeout(std::time::Duration::from_secs(120));
    let job = full_job_id(&client, &args.job)?;
    let mut path = format!("/api/v1/learn/jobs/{job}/model");
    if let Some(round) = args.round {
        path.push_str(&format!("?round={round}"));
    }
    let (bytes, model) = client.get_bytes(&path, "x-openagi-model-id")?;
    if bytes.is_empty() {
        bail!("the daemon sent an empty model");
    }
    openagi_keyfiles::keyfile::write_atomic(&args.out, &bytes, 0o644)
        .with_context(|| format!("writing {}", args.out.display()))?;
    outln!(
        "model {} ({} parameters) written to {}",
        model.unwrap_or_default(),
        bytes.len() / 4,
        args.out.display()
    )?;
    Ok(())
}

/// `openagi learn models`.
pub fn models(dir: &DataDir, args: &ModelsArgs) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?;
    let job = args
        .job
        .as_deref()
        .map(|j| full_job_id(&client, j))
        .transpose()?;
    let mut path = format!("/api/v1/learn/models?final={}", args.final_only);
    if let Some(job) = &job {
        path.push_str(&format!("&job={job}"));
    }
    let answer = client.get_json(&path)?;
    let models: Vec<serde_json::Value> = answer["models"].as_array().cloned().unwrap_or_default();
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&models)?)?;
        return Ok(());
    }
    if models.is_empty() {
        outln!(
            "no models on this node's ledger{}",
            if job.is_some() || args.final_only {
                " that match"
            } else {
                ""
            }
        )?;
        return Ok(());
    }
    let short = |v: &serde_json::Value| {
        let text = v.as_str().unwrap_or("-");
        text.get(..12).unwrap_or(text).to_string()
    };
    outln!(
        "{:<12}  {:<12}  {:<16} {:>5}  {:<12}  {:<18} {:>8}  {:>7}  {:<18} here",
        "model",
        "job",
        "name",
        "round",
        "parent",
        "architecture",
        "accuracy",
        "ε",
        "privacy"
    )?;
    for m in &models {
        let accuracy = m["accuracy"]
            .as_f64()
            .map_or("-".into(), |a| format!("{:.1}%", a * 100.0));
        let epsilon = m["epsilon"]
            .as_f64()
            .map_or("-".into(), |e| format!("{e:.2}"));
        outln!(
            "{:<12}  {:<12}  {:<16} {:>5}  {:<12}  {:<18} {:>8}  {:>7}  {:<18} {}{}",
            short(&m["model"]),
            short(&m["job_id"]),
            m["job_name"].as_str().unwrap_or("?"),
            m["round"].as_u64().unwrap_or(0),
            short(&m["parent"]),
            m["architecture"].as_str().unwrap_or("?"),
            accuracy,
            epsilon,
            m["privacy_mode"].as_str().unwrap_or("?"),
            if m["held_here"] == true { "yes" } else { "no" },
            if m["final_model"] == true {
                "  (final)"
            } else {
                ""
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_prefix_resolves_only_when_it_names_one_job() {
        let a = "ab12cd34ef5600010000000000000000000000000000000000000000000000ff";
        let b = "ab12cd34ef5600020000000000000000000000000000000000000000000000ff";
        let c = "0f00000000000000000000000000000000000000000000000000000000000000";
        let ids = [a, b, c];
        assert_eq!(resolve_job_prefix("0f", ids), Ok(c));
        assert_eq!(resolve_job_prefix(" 0F00 ", ids), Ok(c), "case, space");
        assert_eq!(resolve_job_prefix(a, ids), Ok(a), "a whole id");
        assert_eq!(
            resolve_job_prefix(&a[..16], ids),
            Ok(a),
            "digits past the shared start"
        );
        assert_eq!(
            resolve_job_prefix("ff", ids),
            Err(JobPrefixError::NoMatch("ff".into()))
        );
        let ambiguous = resolve_job_prefix("ab12cd34ef56", ids).expect_err("two match");
        assert!(
            matches!(&ambiguous, JobPrefixError::Ambiguous { count: 2, .. }),
            "{ambiguous:?}"
        );
        let message = ambiguous.to_string();
        assert!(
            message.contains("ab12cd34ef560001, ab12cd34ef560002") && message.contains("ambiguous")
        );
        for bad in ["", "  ", "xyz", "ab-12", "é"] {
            assert_eq!(
                resolve_job_prefix(bad, ids),
                Err(JobPrefixError::NotHex(bad.into())),
                "{bad:?}"
            );
        }
        assert_eq!(
            resolve_job_prefix("ab", []),
            Err(JobPrefixError::NoMatch("ab".into()))
        );
    }

    const EXAMPLE: &str = include_str!("../../../configs/digits-job.toml");

    #[test]
    fn the_example_job_parses_with_and_without_privacy() {
        let spec: JobSpec = toml::from_str(EXAMPLE).expect("example parses");
        spec.validate().expect("example is valid");
        assert_eq!(spec.rounds, 20);
        let private = EXAMPLE
            .replace("# [privacy]", "[privacy]")
            .replace("# dp = ", "dp = ")
            .replace("# delta = ", "delta = ")
            .replace("# budget_epsilon = ", "budget_epsilon = ");
        let spec: JobSpec = toml::from_str(&private).expect("private example parses");
        spec.validate().expect("valid");
        assert!(spec.privacy.is_some());
        let secure = private.replace("# secure_aggregation = ", "secure_aggregation = ");
        let spec: JobSpec = toml::from_str(&secure).expect("secure example parses");
        spec.validate().expect("valid");
        assert_eq!(spec.privacy_mode(), "distributed+secagg");
        let wrong = EXAMPLE.replace("min_clients = 2", "min_clients = 0");
        let spec: JobSpec = toml::from_str(&wrong).expect("parses");
        assert!(spec.validate().is_err());
    }
}
