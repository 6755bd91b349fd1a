//! `/api/v1/validator`: joining and leaving the validator set.
//!
//! The puzzle is solved by the caller (`openagi validator join` runs it on
//! the operator's cores with progress on the terminal) against what
//! `GET /api/v1/validator` gives: this node's key, the network, a recent
//! block to anchor to and the puzzle's parameters. The daemon then signs
//! the request with its identity (the key never leaves it), checks it
//! against the membership of its own chain (so a wrong, stale or too
//! cheap proof is refused at once with the reason, not after ordering),
//! and submits it as a ledger transaction. `GET
//! /api/v1/validator/changes/{tx}` says what the committed transaction
//! did; the node's part switches by itself at the boundary.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use openagi_consensus::membership::{
    Accepted, Change, JoinRequest, LeaveRequest, MembershipRequest, ProofCache, PuzzleVote,
};
use openagi_consensus::{StrictCrypto, Transaction};
use openagi_crypto::Signed;
use openagi_crypto::poc::PuzzleParams;
use serde::Deserialize;
use serde_json::json;

use crate::daemon::api::{ApiState, error, json_body, parse_hash, path_of};
use crate::daemon::follower::{LedgerAccess, SubmitError};

fn change_json(change: &Change) -> serde_json::Value {
    let (kind, key) = match change {
        Change::Join(k) => ("join", k),
        Change::Leave(k) => ("leave", k),
        Change::Remove(k) => ("remove", k),
    };
    json!({ "kind": kind, "key": key.to_hex() })
}

fn params_json(params: &PuzzleParams) -> serde_json::Value {
    json!({
        "difficulty_bits": params.difficulty_bits,
        "memory_kib": params.memory_kib,
        "passes": params.passes,
    })
}

fn accepted_json(accepted: &Accepted) -> serde_json::Value {
    match accepted {
        Accepted::Change(change) => change_json(change),
        Accepted::PuzzleVote(params) => {
            json!({ "kind": "puzzle_vote", "params": params_json(params) })
        }
    }
}

fn no_view() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "this node holds no ledger (no genesis.toml), or has not read it yet",
    )
}

/// `GET /api/v1/validator`: the validator set along this node's chain and
/// what a join must prove.
pub async fn overview(State(state): State<Arc<ApiState>>) -> Response {
    let Some(membership) = state.ledger.membership().membership() else {
        return no_view();
    };
    let epoch = membership.epoch();
    let me = state.identity.public();
    let params = membership.params();
    let anchor = membership.anchor();
    Json(json!({
        "public_key": me.to_hex(),
        "member": epoch.validators.index_of(&me).is_some(),
        "network": hex::encode(epoch.validators.network().0),
        "epoch": epoch.number,
        "first_height": epoch.first_height,
        "validators": epoch.validators.members().iter().map(|k| k.to_hex()).collect::<Vec<_>>(),
        "newcomers": epoch.newcomers.iter().map(|k| k.to_hex()).collect::<Vec<_>>(),
        "transition": membership.transition().map(|t| json!({
            "boundary": t.boundary,
            "changes": t.changes.iter().map(change_json).collect::<Vec<_>>(),
        })),
        "puzzle": params_json(params),
        "pending_puzzle": membership.pending_puzzle().map(|(boundary, p)| json!({
            "boundary": boundary,
            "params": params_json(&p),
        })),
        "puzzle_votes": membership.puzzle_votes().iter().map(|(p, n)| json!({
            "params": params_json(p),
            "votes": n,
        })).collect::<Vec<_>>(),
        "anchor": anchor.map(|(height, hash)| json!({ "height": height, "hash": hex::encode(hash) })),
        "anchor_max_age_blocks": membership.anchor_max_age(),
        "height": membership.height(),
    }))
    .into_response()
}

/// Body of `POST /api/v1/validator/join`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinBody {
    /// The anchor's height.
    pub anchor_height: u64,
    /// The anchor's hash (hex).
    pub anchor_hash: String,
    /// The puzzle's solution.
    pub nonce: u64,
}

/// `POST /api/v1/validator/join`: signs, checks and submits this node's
/// join.
pub async fn join(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    let body: JoinBody = match json_body(body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(anchor_hash) = parse_hash(body.anchor_hash.trim()) else {
        return error(StatusCode::BAD_REQUEST, "anchor_hash must be 64 hex digits");
    };
    let Some(membership) = state.ledger.membership().membership() else {
        return no_view();
    };
    let join = JoinRequest {
        network: membership.epoch().validators.network(),
        anchor_height: body.anchor_height,
        anchor_hash,
        nonce: body.nonce,
    };
    let signed = match Signed::sign(&state.identity, &join) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    submit(&state, MembershipRequest::Join(signed)).await
}

/// `POST /api/v1/validator/leave`: signs, checks and submits this node's
/// leave for the current epoch.
pub async fn leave(State(state): State<Arc<ApiState>>) -> Response {
    let Some(membership) = state.ledger.membership().membership() else {
        return no_view();
    };
    let leave = LeaveRequest {
        network: membership.epoch().validators.network(),
        epoch: membership.epoch().number,
    };
    let signed = match Signed::sign(&state.identity, &leave) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    submit(&state, MembershipRequest::Leave(signed)).await
}

/// Body of `POST /api/v1/validator/puzzle`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PuzzleBody {
    /// Leading zero bits a join must find.
    pub difficulty_bits: u32,
    /// Memory of one attempt, KiB.
    pub memory_kib: u32,
    /// Argon2id passes (default 1).
    pub passes: Option<u32>,
}

/// `POST /api/v1/validator/puzzle`: this validator's vote for new join
/// puzzle parameters, for the current epoch.
pub async fn puzzle_vote(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    let body: PuzzleBody = match json_body(body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(membership) = state.ledger.membership().membership() else {
        return no_view();
    };
    let vote = PuzzleVote {
        network: membership.epoch().validators.network(),
        epoch: membership.epoch().number,
        params: PuzzleParams {
            difficulty_bits: body.difficulty_bits,
            memory_kib: body.memory_kib,
            passes: body.passes.unwrap_or(1),
        },
    };
    let signed = match Signed::sign(&state.identity, &vote) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    submit(&state, MembershipRequest::Puzzle(signed)).await
}

/// Checks `request` against this node's view of the chain (as if the next
/// block carried it; the proof last, off the async workers), then submits
/// it. A refusal is 422 with the reason.
async fn submit(state: &Arc<ApiState>, request: MembershipRequest) -> Response {
    let Some(membership) = state.ledger.membership().membership() else {
        return no_view();
    };
    let next = membership.height().saturating_add(1);
    // One proof at a time on this node: only a join's costs an Argon2 run,
    // and the permit goes with the run. It is free again before the
    // submission, whose admission check takes it too.
    let permit = match &request {
        MembershipRequest::Join(_) => match state.ledger.proof_checks().acquire_owned().await {
            Ok(permit) => Some(permit),
            Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "the node is stopping"),
        },
        _ => None,
    };
    let checked = {
        let request = request.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let change =
                membership.check_request(&request, next, &StrictCrypto, &mut ProofCache::default());
            (change, membership.boundary_for(next))
        })
        .await
    };
    let (accepted, boundary) = match checked {
        Ok((Ok(accepted), boundary)) => (accepted, boundary),
        Ok((Err(refusal), _)) => {
            return error(StatusCode::UNPROCESSABLE_ENTITY, refusal.to_string());
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let payload = match request.to_payload() {
        Ok(p) => p,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let access = LedgerAccess {
        role: state.ledger.clone(),
        net: state.net.clone(),
    };
    let tx: Transaction = match access.own_transaction(payload).await {
        Ok(tx) => tx,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    };
    match access.submit(tx).await {
        Ok(hash) => (
            StatusCode::ACCEPTED,
            Json(json!({
                "tx_hash": hex::encode(hash),
                "change": accepted_json(&accepted),
                // If it commits in the next block; later blocks move it on.
                "takes_effect_after": boundary,
            })),
        )
            .into_response(),
        Err(SubmitError::Duplicate) => error(StatusCode::CONFLICT, "submitted before"),
        Err(SubmitError::Refused(why)) => error(StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// `GET /api/v1/validator/changes/{tx}`: what a committed membership
/// transaction did (`scheduled` with the change, or `refused` with the
/// reason), or `unknown` while it has not committed (or committed long
/// ago: only recent outcomes are kept).
pub async fn change_status(
    State(state): State<Arc<ApiState>>,
    tx: Result<Path<String>, PathRejection>,
) -> Response {
    let tx = match path_of(tx) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let Some(hash) = parse_hash(tx.trim()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the transaction hash is 64 hex digits",
        );
    };
    let view = state.ledger.membership();
    match view.outcome(&hash) {
        None => Json(json!({ "status": "unknown" })).into_response(),
        Some(outcome) => match outcome.result {
            Ok(Accepted::PuzzleVote(params)) => Json(json!({
                "status": "counted",
                "height": outcome.height,
                "change": accepted_json(&Accepted::PuzzleVote(params)),
                // Set once a quorum agrees (on these or other parameters).
                "takes_effect_after": view.membership().and_then(|m| m.pending_puzzle()).filter(|(_, p)| *p == params).map(|(b, _)| b),
            }))
            .into_response(),
            Ok(Accepted::Change(change)) => Json(json!({
                "status": "scheduled",
                "height": outcome.height,
                "change": change_json(&change),
                // Where a change committed at that height takes effect (a
                // removal deferred behind an earlier transition goes later).
                "takes_effect_after": view.membership().map(|m| m.boundary_for(outcome.height)),
            }))
            .into_response(),
            Err(refusal) => Json(json!({
                "status": "refused",
                "height": outcome.height,
                "reason": refusal.to_string(),
            }))
            .into_response(),
        },
    }
}
