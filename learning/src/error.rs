//! The crate-wide error type.

use crate::aggregate::ClientId;

/// Coarse classification of every error this crate returns, so the node can
/// decide what to do (drop an update and penalise its sender, wait for more
/// clients, fix a job spec, stop training) without matching on each variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A parameter or configuration supplied by the caller or a job spec is
    /// invalid (a local bug or a bad spec, not a peer's fault).
    InvalidArgument,
    /// A client's update or payload is unusable: wrong length, non-finite
    /// values, malformed or oversized bytes, a duplicate sender. Drop it;
    /// the sender may be faulty or hostile.
    BadUpdate,
    /// Too few updates for the chosen rule (empty input, or fewer clients
    /// than a Byzantine-robust rule needs for its `f`).
    NotEnoughClients,
    /// A model or update belongs to a different architecture.
    Incompatible,
    /// Running the requested round would exceed the privacy budget.
    BudgetExhausted,
    /// A local data set (CSV, IDX, or samples handed in memory) is
    /// malformed or does not fit the model. The operator's input, not a
    /// peer's fault.
    InvalidData,
    /// The tensor backend failed (e.g. could not read a result back).
    Backend,
}

/// Errors returned by this crate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A caller-supplied parameter is out of range.
    #[error("invalid {what}: {detail}")]
    InvalidArgument {
        /// Which parameter.
        what: &'static str,
        /// Why it was refused.
        detail: String,
    },
    /// There was nothing to aggregate.
    #[error("no {what} given")]
    Empty {
        /// What was missing.
        what: &'static str,
    },
    /// A vector has a different length than the others or than the model.
    #[error("{}length mismatch: expected {expected} values, got {found}", client_prefix(.client))]
    LengthMismatch {
        /// The client whose update it was, when known.
        client: Option<ClientId>,
        /// The length required.
        expected: usize,
        /// The length supplied.
        found: usize,
    },
    /// A vector holds NaN or an infinity.
    #[error("{}non-finite value at index {index}", client_prefix(.client))]
    NonFinite {
        /// The client whose update it was, when known.
        client: Option<ClientId>,
        /// The first offending index.
        index: usize,
    },
    /// Two updates in one aggregation came from the same client.
    #[error("client {client} sent more than one update")]
    DuplicateClient {
        /// The repeated client.
        client: ClientId,
    },
    /// A rule needs more clients than were supplied.
    #[error("{rule} needs at least {needed} clients, got {got}")]
    TooFewClients {
        /// The aggregation rule or operation.
        rule: &'static str,
        /// The minimum it needs.
        needed: usize,
        /// How many it got.
        got: usize,
    },
    /// Encoded bytes are not a valid payload.
    #[error("malformed payload: {detail}")]
    Malformed {
        /// What is wrong with it.
        detail: String,
    },
    /// Input exceeds a size limit.
    #[error("{what} too large: {found} exceeds the limit of {limit}")]
    TooLarge {
        /// What was measured.
        what: &'static str,
        /// The limit.
        limit: usize,
        /// The size found.
        found: usize,
    },
    /// A model or update does not match the expected architecture.
    #[error("architecture mismatch: expected {expected}, got {found}")]
    DescriptorMismatch {
        /// Summary of the expected architecture.
        expected: String,
        /// Summary of the architecture supplied.
        found: String,
    },
    /// A data set is malformed or does not fit the model.
    #[error("{}{detail}", data_prefix(.origin, .line))]
    Data {
        /// Which input, e.g. `"CSV"` or `"IDX images"`.
        origin: &'static str,
        /// The 1-based line (CSV) the problem is on, when there is one.
        line: Option<u64>,
        /// What is wrong.
        detail: String,
    },
    /// The tensor backend reported a failure.
    #[error("tensor backend: {detail}")]
    Backend {
        /// The backend's message.
        detail: String,
    },
    /// Running one more round would push ε past the budget.
    #[error("privacy budget exhausted: ε would reach {would_be:.4}, budget is {budget}")]
    BudgetExceeded {
        /// The ε budget.
        budget: f64,
        /// The ε the round would lead to.
        would_be: f64,
    },
}

fn client_prefix(client: &Option<ClientId>) -> String {
    match client {
        Some(c) => format!("update from {c}: "),
        None => String::new(),
    }
}

fn data_prefix(origin: &str, line: &Option<u64>) -> String {
    match line {
        Some(l) => format!("{origin} line {l}: "),
        None => format!("{origin}: "),
    }
}

impl Error {
    /// The coarse class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::Empty { .. } | Error::TooFewClients { .. } => ErrorKind::NotEnoughClients,
            Error::LengthMismatch { .. }
            | Error::NonFinite { .. }
            | Error::DuplicateClient { .. }
            | Error::Malformed { .. }
            | Error::TooLarge { .. } => ErrorKind::BadUpdate,
            Error::DescriptorMismatch { .. } => ErrorKind::Incompatible,
            Error::BudgetExceeded { .. } => ErrorKind::BudgetExhausted,
            Error::Data { .. } => ErrorKind::InvalidData,
            Error::Backend { .. } => ErrorKind::Backend,
        }
    }

    pub(crate) fn invalid(what: &'static str, detail: impl Into<String>) -> Self {
        Error::InvalidArgument {
            what,
            detail: detail.into(),
        }
    }

    pub(crate) fn data(origin: &'static str, detail: impl Into<String>) -> Self {
        Error::Data {
            origin,
            line: None,
            detail: detail.into(),
        }
    }

    pub(crate) fn backend(detail: impl std::fmt::Display) -> Self {
        Error::Backend {
            detail: detail.to_string(),
        }
    }

    pub(crate) fn malformed(detail: impl Into<String>) -> Self {
        Error::Malformed {
            detail: detail.into(),
        }
    }
}
