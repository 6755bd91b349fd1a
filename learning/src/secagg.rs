//! Secure aggregation: the coordinator learns the sum of a round's updates
//! and nothing about any single one.
//!
//! This is SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure
//! Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020) as
//! two sans-IO state machines: [`SecAggParticipant`] runs on every training
//! node, [`SecAggCoordinator`] on the job's coordinator. Neither does I/O,
//! reads a clock or draws OS randomness; the node carries their messages
//! (sealed end to end where they hold secrets), passes the time in, and
//! seeds every random choice.
//!
//! # The protocol
//!
//! The round's participants are an ordered list of identity keys (the
//! coordinator's selection, the same on every node). Each is joined to its
//! `k` neighbours on a ring over that order (all others when `k ≥ n − 1`).
//! Five stages, each closed by every expected reply or by its deadline,
//! whichever comes first; whoever has not answered by then has dropped out:
//!
//! 1. **Advertise**: each participant draws two X25519 key pairs for this
//!    round (one to encrypt shares, one to agree masks) and a self-mask
//!    seed, and sends both public keys and a commitment to the seed, signed
//!    with its Ed25519 identity. The coordinator forwards each participant
//!    its neighbours' signed keys, so a coordinator cannot substitute its
//!    own.
//! 2. **Share keys**: each participant splits its mask secret key and its
//!    self-mask seed with Shamir's scheme (`t` of `k`, over GF(2⁸), by the
//!    `blahaj` crate) and sends one share of each to each neighbour,
//!    encrypted with ChaCha20-Poly1305 under a key both ends derive from
//!    their X25519 agreement: the coordinator routes ciphertext only.
//! 3. **Masked input**: each participant quantises its update onto the ring
//!    Z/2³², adds the pseudo-random mask of its seed (ChaCha20 as the PRG)
//!    and, for every neighbour that shared, the pairwise mask both derive
//!    from their mask-key agreement, added by the lower index and
//!    subtracted by the higher. The coordinator adds what arrives; pairwise
//!    masks between survivors cancel in that sum.
//! 4. **Consistency check**: the coordinator announces who sent a masked
//!    input; each survivor signs that list. A participant reveals shares
//!    only for a list signed by more than half of the round's participants
//!    (and at least `t`). Each signs one list, so only one list can ever
//!    gather that many signatures: a coordinator cannot tell some of `u`'s
//!    neighbours that `u` survived and others that it dropped.
//! 5. **Unmask**: for each neighbour, a survivor reveals its share of the
//!    self-mask seed if that neighbour survived, or of its mask secret key
//!    if it dropped after sharing; never both for one neighbour. With `t`
//!    shares per participant the coordinator removes the self masks of the
//!    survivors and the pairwise masks the survivors added for the dropped,
//!    and is left with the sum of the survivors' quantised updates.
//!
//! A round ends in [`CoordinatorOutput::Finished`] or, when too few
//! participants answered at some stage (fewer than `min_survivors`, fewer
//! than half of the participants signing the survivor list, or a
//! participant with fewer than `t` neighbours left to reveal its shares), in
//! [`CoordinatorOutput::Failed`] at that stage's deadline at the latest: it
//! never waits forever.
//!
//! # Threat model, stated
//!
//! Against a coordinator that follows the protocol, any set of fewer than
//! `t` colluding participants among a participant's neighbours learns
//! nothing about that participant's update beyond the sum. Against a
//! coordinator that lies (substitutes keys, drops, withholds or replays
//! messages, or announces different survivor lists to different
//! participants) and does not collude with participants, signed keys,
//! authenticated encryption, the consistency check and a participant's
//! refusal to mask with fewer than `k − t + 1` neighbours (else the
//! neighbours left out could reveal its seed while its few pairwise masks
//! were stripped) keep every update hidden. A coordinator that colludes
//! with participants is outside this model, as in SecAgg+; so the node
//! never makes a job's coordinator a participant of its secure rounds. The
//! coordinator can always make a round fail; it cannot make a participant
//! reveal both secrets of one neighbour.
//!
//! # Quantisation and overflow, stated
//!
//! An update is first clipped to L2 norm `C` when distributed DP is on,
//! then each coordinate to `[−c, c]` (`clip_range`), scaled by
//! `(2^(q−1) − 1) / c` for `q` = `quant_bits` and rounded stochastically
//! (unbiased: the expected value is the scaled coordinate), and stored as a
//! two's-complement `i32` on the ring Z/2³². The sum is read back as an
//! `i32` and divided by the scale. It is exact as long as
//! `|Σ values| < 2³¹`: the session refuses any configuration where
//! `n · 2^(q−1) > 2³⁰` (inputs take at most half the range) and, with
//! noise, where eight standard deviations of the summed noise exceed the
//! other half. The default `q = 20` admits 2,048 participants; the
//! quantisation error of a coordinate of the sum is at most `n / scale`.
//!
//! # Distributed differential privacy
//!
//! With [`DistributedNoise`], each participant clips its update to L2 norm
//! `C` and adds Gaussian noise of standard deviation `z · C / √(m − 1)` to
//! each quantised coordinate (in the integer domain, rounded), where `m` is
//! the round's `min_survivors`. A round closes only with at least `m`
//! survivors, and every participant knows its own noise and can subtract
//! it from the published sum, so what protects one participant is the
//! noise of the other `s − 1 ≥ m − 1` survivors: at least `z · C`, the
//! central DP-FedAvg noise, while no party ever sees an update with less
//! than its own share of it. [`SecAggResult::charged_noise_multiplier`] is
//! what the accountant should charge: the noise of `s − 1` survivors (more
//! survivors, more noise) over the sensitivity of the quantised sum, which
//! stochastic rounding enlarges by at most `√d` integer units. The sum of
//! the participants' independently rounded Gaussians is treated as a
//! Gaussian of the summed variance; at the integer scales used here
//! (standard deviations in the tens of thousands of units) the difference
//! is far below the accountant's resolution (Kairouz, Liu, Steinke, "The
//! Distributed Discrete Gaussian Mechanism", ICML 2021, bound it).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use openagi_crypto::aead::{self, AeadKey};
use openagi_crypto::seal::{X25519_LEN, X25519Public, X25519Secret};
use openagi_crypto::{Identity, PublicKey, Signature};
use rand::{Rng, RngCore, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{Error, Result, dp};

/// Most participants one session admits (a federation round's limit).
pub const MAX_PARTICIPANTS: usize = crate::federation::MAX_PARTICIPANTS;
/// Most coordinates one secure sum carries: 16 Mi values, 64 MiB of
/// masked input per participant.
pub const MAX_DIMENSION: usize = 1 << 24;
/// Most neighbours a participant shares with: GF(2⁸) Shamir shares are
/// numbered 1 to 255.
pub const MAX_NEIGHBOURS: u16 = 254;
/// Bytes of one Shamir share of a 32-byte secret: its x coordinate and one
/// y byte per secret byte.
pub const SHARE_LEN: usize = 1 + 32;
/// Bytes of one encrypted share message: the self-mask seed's share and the
/// mask key's share, and the AEAD tag.
pub const ENCRYPTED_SHARE_LEN: usize = 2 * SHARE_LEN + aead::TAG_LEN;

const KEYS_CONTEXT: &str = "openagi/secagg/keys/v1";
const SURVIVORS_CONTEXT: &str = "openagi/secagg/survivors/v1";
const SHARE_KEY_KDF: &str = "openagi secagg 2026 share encryption key v1";
const PAIR_SEED_KDF: &str = "openagi secagg 2026 pairwise mask seed v1";
const SEED_COMMITMENT_KDF: &str = "openagi secagg 2026 self-mask seed commitment v1";

/// A participant's position in the session's ordered participant list.
pub type Index = u16;

/// The job's secure-aggregation settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggConfig {
    /// `k`: how many neighbours each participant masks with and shares its
    /// secrets among; even (half on each side of the ring). Rounds with
    /// `n − 1 ≤ k` participants use the complete graph.
    pub neighbours: u16,
    /// `t`: shares that reconstruct a participant's secrets; more than half
    /// of the effective `k`, at most `k`. A participant survives the
    /// dropout of up to `k − t` of its neighbours.
    pub threshold: u16,
    /// The fewest survivors a round closes with. With distributed noise it
    /// is also `m`, the count the noise is split across.
    pub min_survivors: u16,
    /// `c`: each coordinate is clipped to `[−c, c]` before quantisation.
    pub clip_range: f32,
    /// `q`: bits per quantised coordinate, 2 to 24.
    #[serde(default = "default_quant_bits")]
    pub quant_bits: u8,
    /// How long each stage waits for its replies, in milliseconds.
    pub stage_timeout_ms: u64,
    /// Distributed DP: each participant's share of the Gaussian noise.
    #[serde(default)]
    pub noise: Option<DistributedNoise>,
}

fn default_quant_bits() -> u8 {
    DEFAULT_QUANT_BITS
}

/// The default `q`: 2,048 participants fit the ring (see the module doc).
pub const DEFAULT_QUANT_BITS: u8 = 20;

/// Distributed DP under secure aggregation: clipping bound `C` and the
/// noise multiplier `z` the sum must carry at least.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributedNoise {
    /// `C`: every update is clipped to this L2 norm.
    pub clip_norm: f64,
    /// `z`: the sum carries Gaussian noise of standard deviation `z · C`
    /// or more.
    pub noise_multiplier: f64,
}

impl SecAggConfig {
    /// The scale from a clipped coordinate to its integer on the ring.
    pub fn scale(&self) -> f64 {
        (f64::powi(2.0, i32::from(self.quant_bits) - 1) - 1.0) / f64::from(self.clip_range)
    }

    /// Standard deviation, in integer units, of the noise each participant
    /// adds (zero without distributed noise).
    pub fn participant_noise_std(&self) -> f64 {
        match self.noise {
            Some(noise) => {
                noise.noise_multiplier * noise.clip_norm * self.scale()
                    / f64::from(self.min_survivors.saturating_sub(1).max(1)).sqrt()
            }
            None => 0.0,
        }
    }

    /// The smallest noise multiplier a round that closes can be charged:
    /// with exactly `min_survivors` survivors, over the sensitivity of a
    /// quantised update of `dimension` coordinates. A budget check before a
    /// round uses this; the round itself reports what it carried.
    pub fn minimum_charged_noise_multiplier(&self, dimension: usize) -> Option<f64> {
        self.noise.map(|noise| {
            self.charged_noise_multiplier(noise, usize::from(self.min_survivors), dimension)
        })
    }

    /// The noise multiplier a round with `survivors` survivors is charged
    /// (as [`SecAggResult::charged_noise_multiplier`] reports it), for a
    /// node that replays its ledger.
    pub fn charged_noise_multiplier_for(&self, survivors: usize, dimension: usize) -> Option<f64> {
        self.noise
            .map(|noise| self.charged_noise_multiplier(noise, survivors, dimension))
    }

    fn charged_noise_multiplier(
        &self,
        noise: DistributedNoise,
        survivors: usize,
        dimension: usize,
    ) -> f64 {
        // Each survivor can subtract its own noise: the others' protects it.
        let summed_std = self.participant_noise_std() * (survivors.saturating_sub(1) as f64).sqrt();
        let sensitivity = noise.clip_norm * self.scale() + (dimension as f64).sqrt();
        summed_std / sensitivity
    }

    pub(crate) fn validate(&self, participants: usize) -> Result<()> {
        if self.neighbours < 2
            || !self.neighbours.is_multiple_of(2)
            || self.neighbours > MAX_NEIGHBOURS
        {
            return Err(Error::invalid(
                "secure aggregation neighbours",
                format!(
                    "{} must be even and between 2 and {MAX_NEIGHBOURS}",
                    self.neighbours
                ),
            ));
        }
        if !(2..=24).contains(&self.quant_bits) {
            return Err(Error::invalid(
                "secure aggregation quant_bits",
                format!("{} must be between 2 and 24", self.quant_bits),
            ));
        }
        if !(self.clip_range.is_finite() && self.clip_range > 0.0) {
            return Err(Error::invalid(
                "secure aggregation clip_range",
                format!("{} must be a finite positive number", self.clip_range),
            ));
        }
        if self.stage_timeout_ms == 0 {
            return Err(Error::invalid(
                "secure aggregation stage_timeout_ms",
                "must be at least 1",
            ));
        }
        let degree = effective_degree(participants, self.neighbours);
        if usize::from(self.threshold) > degree || usize::from(self.threshold) * 2 <= degree {
            return Err(Error::invalid(
                "secure aggregation threshold",
                format!(
                    "{} must be more than half of and at most the {degree} neighbours each of \
                     {participants} participants has",
                    self.threshold
                ),
            ));
        }
        if usize::from(self.min_survivors) < 2 || usize::from(self.min_survivors) > participants {
            return Err(Error::invalid(
                "secure aggregation min_survivors",
                format!(
                    "{} must be at least 2 and at most the {participants} participants",
                    self.min_survivors
                ),
            ));
        }
        // Inputs may fill half the i32 range, noise the other half.
        let input_bound = participants as f64 * f64::powi(2.0, i32::from(self.quant_bits) - 1);
        if input_bound > f64::powi(2.0, 30) {
            return Err(Error::invalid(
                "secure aggregation quant_bits",
                format!(
                    "{participants} participants × 2^{} exceeds 2^30: the sum could overflow \
                     the ring; lower quant_bits",
                    self.quant_bits - 1
                ),
            ));
        }
        if let Some(noise) = self.noise {
            let config = dp::DpConfig {
                clip_norm: noise.clip_norm,
                noise_multiplier: noise.noise_multiplier,
            };
            config.validate()?;
            let summed_std = self.participant_noise_std() * (participants as f64).sqrt();
            if 8.0 * summed_std > f64::powi(2.0, 30) {
                return Err(Error::invalid(
                    "secure aggregation noise",
                    format!(
                        "eight standard deviations of the summed noise ({summed_std:.0} units \
                         each) exceed 2^30: lower quant_bits or the noise multiplier"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The secure-aggregation settings a job spec names
/// (`secure_aggregation = { ... }` in the job's TOML). Each round turns them
/// into a [`SecAggConfig`] for its participants: the fewest survivors is the
/// job's `min_clients`, each stage waits the job's round deadline, and the
/// noise comes from the job's `[privacy]` (distributed DP).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggSpec {
    /// `k`: neighbours per participant (even); rounds with fewer than
    /// `k + 1` participants use the complete graph.
    #[serde(default = "default_neighbours")]
    pub neighbours: u16,
    /// `t`: shares that reconstruct a participant's secrets. Default: two
    /// thirds of the neighbours a round's participants have (a third may
    /// drop). Capped at that count in small rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u16>,
    /// `c`: each coordinate of an update is clipped to `[−c, c]`.
    pub clip_range: f32,
    /// `q`: bits per quantised coordinate.
    #[serde(default = "default_quant_bits")]
    pub quant_bits: u8,
}

fn default_neighbours() -> u16 {
    DEFAULT_NEIGHBOURS
}

/// The default `k`: SecAgg+ needs O(log n) neighbours; 16 covers rounds of
/// hundreds with a third of each neighbourhood allowed to drop.
pub const DEFAULT_NEIGHBOURS: u16 = 16;

impl SecAggSpec {
    /// The round's settings for `participants` participants.
    pub fn round_config(
        &self,
        participants: usize,
        min_clients: usize,
        stage_timeout_ms: u64,
        noise: Option<DistributedNoise>,
    ) -> SecAggConfig {
        let degree = effective_degree(participants, self.neighbours);
        let threshold = self
            .threshold
            .map_or_else(|| (degree * 2).div_ceil(3), usize::from)
            .min(degree)
            .max(degree / 2 + 1);
        SecAggConfig {
            neighbours: self.neighbours,
            threshold: threshold as u16,
            min_survivors: min_clients.clamp(2, participants.max(2)) as u16,
            clip_range: self.clip_range,
            quant_bits: self.quant_bits,
            stage_timeout_ms,
            noise,
        }
    }

    /// Checks the settings for the largest round a job may have; errors
    /// name the setting.
    pub fn validate(&self, noise: Option<DistributedNoise>) -> Result<()> {
        if let Some(t) = self.threshold
            && (t > self.neighbours || 2 * t <= self.neighbours)
        {
            return Err(Error::invalid(
                "secure aggregation threshold",
                format!(
                    "{t} must be more than half of and at most the {} neighbours",
                    self.neighbours
                ),
            ));
        }
        let config = self.round_config(MAX_PARTICIPANTS, 2, 1, noise);
        config.validate(MAX_PARTICIPANTS)
    }
}

/// Neighbours of each participant when `k` is applied to `n` participants.
fn effective_degree(n: usize, k: u16) -> usize {
    usize::from(k).min(n.saturating_sub(1))
}

/// One round's secure-aggregation session: what coordinator and
/// participants must agree on before it starts.
#[derive(Debug, Clone)]
pub struct Session {
    config: SecAggConfig,
    context: [u8; 32],
    participants: Vec<PublicKey>,
    dimension: usize,
}

impl Session {
    /// Checks and builds a session. `context` binds every signature and key
    /// derivation to this round (the node derives it from the job id and
    /// round number); `participants` is the round's selection in its
    /// agreed order; `dimension` is the length of every update.
    pub fn new(
        config: SecAggConfig,
        context: [u8; 32],
        participants: Vec<PublicKey>,
        dimension: usize,
    ) -> Result<Self> {
        if participants.len() < 3 || participants.len() > MAX_PARTICIPANTS {
            return Err(Error::invalid(
                "secure aggregation participants",
                format!(
                    "{} given, 3 to {MAX_PARTICIPANTS} allowed",
                    participants.len()
                ),
            ));
        }
        let distinct: BTreeSet<&PublicKey> = participants.iter().collect();
        if distinct.len() != participants.len() {
            return Err(Error::invalid(
                "secure aggregation participants",
                "a key appears twice",
            ));
        }
        if dimension == 0 || dimension > MAX_DIMENSION {
            return Err(Error::invalid(
                "secure aggregation dimension",
                format!("{dimension} given, 1 to {MAX_DIMENSION} allowed"),
            ));
        }
        config.validate(participants.len())?;
        Ok(Session {
            config,
            context,
            participants,
            dimension,
        })
    }

    /// The job's settings.
    pub fn config(&self) -> &SecAggConfig {
        &self.config
    }

    /// The round's participants, in order.
    pub fn participants(&self) -> &[PublicKey] {
        &self.participants
    }

    /// Length of every update.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// The position of `key` in the participant list.
    pub fn index_of(&self, key: &PublicKey) -> Option<Index> {
        self.participants
            .iter()
            .position(|p| p == key)
            .map(|i| i as Index)
    }

    /// The neighbours of participant `i` on the ring, in ascending order.
    pub fn neighbours(&self, i: Index) -> Vec<Index> {
        let n = self.participants.len();
        let i = usize::from(i);
        let degree = effective_degree(n, self.config.neighbours);
        let mut out: Vec<Index> = if degree == n - 1 {
            (0..n).filter(|&j| j != i).map(|j| j as Index).collect()
        } else {
            // degree < n − 1 and even, so i ± d never meet for d ≤ degree / 2.
            (1..=degree / 2)
                .flat_map(|d| [(i + d) % n, (i + n - d) % n])
                .map(|j| j as Index)
                .collect()
        };
        out.sort_unstable();
        out
    }

    fn is_neighbour(&self, a: Index, b: Index) -> bool {
        let n = self.participants.len();
        let degree = effective_degree(n, self.config.neighbours);
        if a == b || usize::from(a) >= n || usize::from(b) >= n {
            return false;
        }
        let d = (usize::from(a) + n - usize::from(b)) % n;
        d.min(n - d) <= degree / 2 || degree == n - 1
    }

    fn keys_message(
        &self,
        index: Index,
        cipher: &X25519Public,
        mask: &X25519Public,
        commitment: &[u8; 32],
    ) -> Vec<u8> {
        let mut m = Vec::with_capacity(32 + 2 + 3 * 32);
        m.extend_from_slice(&self.context);
        m.extend_from_slice(&index.to_be_bytes());
        m.extend_from_slice(&cipher.to_bytes());
        m.extend_from_slice(&mask.to_bytes());
        m.extend_from_slice(commitment);
        m
    }

    fn survivors_message(&self, survivors: &[Index]) -> Vec<u8> {
        let mut m = Vec::with_capacity(32 + 4 + 2 * survivors.len());
        m.extend_from_slice(&self.context);
        m.extend_from_slice(&(survivors.len() as u32).to_be_bytes());
        for s in survivors {
            m.extend_from_slice(&s.to_be_bytes());
        }
        m
    }

    fn seed_commitment(&self, index: Index, seed: &[u8; 32]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key(SEED_COMMITMENT_KDF);
        h.update(&self.context);
        h.update(&index.to_be_bytes());
        h.update(seed);
        *h.finalize().as_bytes()
    }

    fn share_key(&self, shared: &[u8; X25519_LEN], from: Index, to: Index) -> AeadKey {
        let mut h = blake3::Hasher::new_derive_key(SHARE_KEY_KDF);
        h.update(shared);
        h.update(&self.context);
        h.update(&from.to_be_bytes());
        h.update(&to.to_be_bytes());
        AeadKey::from_bytes(*h.finalize().as_bytes())
    }

    fn share_aad(&self, from: Index, to: Index) -> Vec<u8> {
        let mut aad = self.context.to_vec();
        aad.extend_from_slice(&from.to_be_bytes());
        aad.extend_from_slice(&to.to_be_bytes());
        aad
    }

    fn pair_seed(&self, shared: &[u8; X25519_LEN], a: Index, b: Index) -> Zeroizing<[u8; 32]> {
        let (low, high) = if a < b { (a, b) } else { (b, a) };
        let mut h = blake3::Hasher::new_derive_key(PAIR_SEED_KDF);
        h.update(shared);
        h.update(&self.context);
        h.update(&low.to_be_bytes());
        h.update(&high.to_be_bytes());
        Zeroizing::new(*h.finalize().as_bytes())
    }

    /// Signatures a survivor list needs before shares are revealed: more
    /// than half of the round's participants (so no two lists can both
    /// have them, whatever the coordinator tells whom) and at least `t`.
    pub fn signatures_needed(&self) -> usize {
        (self.participants.len() / 2 + 1).max(usize::from(self.config.threshold))
    }
}

/// A participant's signed keys for one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyAdvert {
    /// X25519 key its shares are encrypted to.
    pub cipher_key: X25519Public,
    /// X25519 key its pairwise masks are agreed with.
    pub mask_key: X25519Public,
    /// BLAKE3 commitment to its self-mask seed, so that the coordinator can
    /// tell a reconstructed seed from a corrupted one.
    pub seed_commitment: [u8; 32],
    /// Its identity's signature over the round context, its index and the
    /// three values above.
    pub signature: Signature,
}

/// One participant's shares for one neighbour, encrypted to that neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    /// Who made the shares.
    pub from: Index,
    /// Who can open them.
    pub to: Index,
    /// ChaCha20-Poly1305 ciphertext of both shares.
    pub ciphertext: Vec<u8>,
}

/// The coordinator's request to reveal shares, with the proof that the
/// survivor list it names is the one the survivors signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    /// Who sent a masked input, ascending.
    pub survivors: Vec<Index>,
    /// Survivors' signatures over that list.
    pub signatures: Vec<(Index, Signature)>,
}

/// A participant's revealed shares: of the self-mask seed of each
/// surviving neighbour, of the mask key of each neighbour that dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unmasking {
    /// `(owner, share)` of surviving neighbours' self-mask seeds.
    pub seed_shares: Vec<(Index, Vec<u8>)>,
    /// `(owner, share)` of dropped neighbours' mask secret keys.
    pub mask_key_shares: Vec<(Index, Vec<u8>)>,
}

/// What the coordinator sends a participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToParticipant {
    /// Stage 1's result: the signed keys of the neighbours that advertised.
    Keys(Vec<(Index, KeyAdvert)>),
    /// Stage 2's result: the shares addressed to this participant.
    Shares(Vec<EncryptedShare>),
    /// Stage 3's result: who sent a masked input, to sign.
    Survivors(Vec<Index>),
    /// Stage 4's result: reveal shares.
    Unmask(UnmaskRequest),
}

/// A masked, quantised update: one ring element per coordinate. On the
/// wire it is little-endian bytes, four per coordinate (a varint encoding
/// of uniform 32-bit values would take five), so the largest update a job
/// may have fits the learn protocol's request limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedInput(pub Vec<u32>);

impl Serialize for MaskedInput {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(self.0.len() * 4);
        for v in &self.0 {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        serializer.serialize_bytes(&bytes)
    }
}

impl<'de> Deserialize<'de> for MaskedInput {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = MaskedInput;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("little-endian 32-bit ring elements")
            }
            fn visit_bytes<E: serde::de::Error>(
                self,
                bytes: &[u8],
            ) -> std::result::Result<MaskedInput, E> {
                if !bytes.len().is_multiple_of(4) {
                    return Err(E::custom(format!(
                        "{} bytes is not a whole number of 32-bit values",
                        bytes.len()
                    )));
                }
                Ok(MaskedInput(
                    bytes
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ))
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}

/// What a participant sends the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromParticipant {
    /// Stage 1.
    Advertise(KeyAdvert),
    /// Stage 2: one encrypted share per neighbour.
    Shares(Vec<EncryptedShare>),
    /// Stage 3: the masked, quantised update.
    Masked(MaskedInput),
    /// Stage 4: the signature over the survivor list.
    Consistency(Signature),
    /// Stage 5.
    Unmask(Unmasking),
}

/// The protocol's stages, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Stage {
    /// Keys are advertised.
    Advertise,
    /// Encrypted shares are exchanged.
    ShareKeys,
    /// Masked inputs are collected.
    MaskedInput,
    /// Survivors sign the survivor list.
    ConsistencyCheck,
    /// Shares are revealed and the sum unmasked.
    Unmask,
    /// The round has ended.
    Done,
}

impl Stage {
    /// A stable lower-case name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Advertise => "advertise",
            Stage::ShareKeys => "share_keys",
            Stage::MaskedInput => "masked_input",
            Stage::ConsistencyCheck => "consistency_check",
            Stage::Unmask => "unmask",
            Stage::Done => "done",
        }
    }
}

fn protocol(stage: Stage, detail: impl Into<String>) -> Error {
    Error::malformed(format!(
        "secure aggregation, {}: {}",
        stage.as_str(),
        detail.into()
    ))
}

// ---------------------------------------------------------------------------
// Quantisation and masks
// ---------------------------------------------------------------------------

/// Quantises `update` onto the ring as the module doc states: L2 clip when
/// `noise` is set, coordinate clip to `[−c, c]`, scale, stochastic rounding,
/// then the participant's share of the noise.
pub fn quantise<R: Rng + ?Sized>(
    config: &SecAggConfig,
    update: &[f32],
    rng: &mut R,
) -> Result<Vec<u32>> {
    let mut values = update.to_vec();
    if let Some(noise) = config.noise {
        dp::clip_update(&mut values, noise.clip_norm)?;
    } else if let Some(index) = values.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite {
            client: None,
            index,
        });
    }
    let scale = config.scale();
    let clip = f64::from(config.clip_range);
    let noise_std = config.participant_noise_std();
    Ok(values
        .iter()
        .map(|&x| {
            let scaled = f64::from(x).clamp(-clip, clip) * scale;
            let floor = scaled.floor();
            let up = rng.random::<f64>() < scaled - floor;
            let mut integer = floor as i64 + i64::from(up);
            if noise_std > 0.0 {
                let n: f64 = StandardNormal.sample(rng);
                integer += (noise_std * n).round() as i64;
            }
            // Two's complement on Z/2^32; the validated bounds keep the sum
            // inside the i32 range.
            integer as i32 as u32
        })
        .collect())
}

/// Reads a summed ring vector back to floats.
pub fn dequantise(config: &SecAggConfig, sum: &[u32]) -> Vec<f32> {
    let scale = config.scale();
    sum.iter()
        .map(|&v| (f64::from(v as i32) / scale) as f32)
        .collect()
}

/// Adds (or subtracts) the ChaCha20 keystream of `seed` to `acc`, one
/// 32-bit word per coordinate.
fn apply_mask(acc: &mut [u32], seed: &[u8; 32], subtract: bool) {
    let mut prg = rand_chacha::ChaCha20Rng::from_seed(*seed);
    let mut block = [0u32; 64];
    for chunk in acc.chunks_mut(block.len()) {
        let words = &mut block[..chunk.len()];
        prg.fill(words);
        if subtract {
            for (a, w) in chunk.iter_mut().zip(words.iter()) {
                *a = a.wrapping_sub(*w);
            }
        } else {
            for (a, w) in chunk.iter_mut().zip(words.iter()) {
                *a = a.wrapping_add(*w);
            }
        }
    }
}

fn split_secret<R: RngCore + ?Sized>(
    secret: &[u8; 32],
    threshold: u16,
    count: usize,
    rng: &mut R,
) -> Vec<Vec<u8>> {
    // blahaj draws its polynomial coefficients from a rand 0.10 RNG; seed
    // one from the caller's RNG so the split stays replayable.
    let mut seed = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(&mut *seed);
    let mut share_rng = share_rng::from_seed(*seed);
    blahaj::Sharks(threshold as u8)
        .dealer_rng(secret, &mut share_rng)
        .take(count)
        .map(|share| Vec::from(&share))
        .collect()
}

fn recover_secret(threshold: u16, shares: &[Vec<u8>]) -> Option<Zeroizing<[u8; 32]>> {
    let parsed: Vec<blahaj::Share> = shares
        .iter()
        .filter_map(|s| blahaj::Share::try_from(s.as_slice()).ok())
        .collect();
    let secret = blahaj::Sharks(threshold as u8).recover(&parsed).ok()?;
    let bytes: [u8; 32] = secret.as_slice().try_into().ok()?;
    Some(Zeroizing::new(bytes))
}

fn check_share(stage: Stage, share: &[u8]) -> Result<()> {
    if share.len() != SHARE_LEN || share[0] == 0 {
        return Err(protocol(
            stage,
            format!("a share must be {SHARE_LEN} bytes with a nonzero x coordinate"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Participant
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParticipantStage {
    AwaitingKeys,
    AwaitingShares,
    ReadyForInput,
    AwaitingSurvivors,
    AwaitingUnmask,
    Done,
}

struct NeighbourKeys {
    cipher: X25519Public,
    mask: X25519Public,
}

struct HeldShares {
    seed: Vec<u8>,
    mask_key: Vec<u8>,
}

impl Drop for HeldShares {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.seed.zeroize();
        self.mask_key.zeroize();
    }
}

/// A participant's side of one secure-aggregation round, as a sans-IO state
/// machine: each `handle_*` takes what the coordinator sent and returns the
/// one reply to send back (an error means: drop out of this round; the
/// round tolerates it).
pub struct SecAggParticipant {
    session: Session,
    me: Index,
    neighbours: Vec<Index>,
    cipher_secret: X25519Secret,
    mask_secret: X25519Secret,
    seed: Zeroizing<[u8; 32]>,
    stage: ParticipantStage,
    keys: BTreeMap<Index, NeighbourKeys>,
    held: BTreeMap<Index, HeldShares>,
    survivors: Vec<Index>,
}

impl std::fmt::Debug for SecAggParticipant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggParticipant")
            .field("me", &self.me)
            .field("stage", &self.stage)
            .field("neighbours", &self.neighbours)
            .finish_non_exhaustive()
    }
}

impl SecAggParticipant {
    /// Starts a round for `identity`, which must be among the session's
    /// participants; returns the participant and its stage-1 message.
    pub fn new<R: RngCore + ?Sized>(
        session: Session,
        identity: &Identity,
        rng: &mut R,
    ) -> Result<(Self, FromParticipant)> {
        let me = session.index_of(&identity.public()).ok_or_else(|| {
            Error::invalid(
                "secure aggregation participant",
                "this node is not among the round's participants",
            )
        })?;
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut *bytes);
        let cipher_secret = X25519Secret::from_bytes(*bytes);
        rng.fill_bytes(&mut *bytes);
        let mask_secret = X25519Secret::from_bytes(*bytes);
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut *seed);
        let cipher_key = cipher_secret.public();
        let mask_key = mask_secret.public();
        let seed_commitment = session.seed_commitment(me, &seed);
        let signature = identity.sign(
            KEYS_CONTEXT,
            &session.keys_message(me, &cipher_key, &mask_key, &seed_commitment),
        );
        let neighbours = session.neighbours(me);
        let participant = SecAggParticipant {
            session,
            me,
            neighbours,
            cipher_secret,
            mask_secret,
            seed,
            stage: ParticipantStage::AwaitingKeys,
            keys: BTreeMap::new(),
            held: BTreeMap::new(),
            survivors: Vec::new(),
        };
        let advert = KeyAdvert {
            cipher_key,
            mask_key,
            seed_commitment,
            signature,
        };
        Ok((participant, FromParticipant::Advertise(advert)))
    }

    /// This participant's index in the session.
    pub fn index(&self) -> Index {
        self.me
    }

    /// Whether the participant has answered the last stage.
    pub fn is_done(&self) -> bool {
        self.stage == ParticipantStage::Done
    }

    fn expect(&self, stage: ParticipantStage, at: Stage) -> Result<()> {
        if self.stage != stage {
            return Err(protocol(at, format!("not expected now ({:?})", self.stage)));
        }
        Ok(())
    }

    /// Handles any coordinator message; the masked input stage, which needs
    /// the local update, is [`SecAggParticipant::masked_input`].
    pub fn handle_message<R: RngCore + ?Sized>(
        &mut self,
        message: ToParticipant,
        identity: &Identity,
        rng: &mut R,
    ) -> Result<Option<FromParticipant>> {
        match message {
            ToParticipant::Keys(adverts) => self.handle_keys(&adverts, rng).map(Some),
            ToParticipant::Shares(shares) => self.handle_shares(&shares).map(|()| None),
            ToParticipant::Survivors(survivors) => {
                self.handle_survivors(&survivors, identity).map(Some)
            }
            ToParticipant::Unmask(request) => self.handle_unmask(&request).map(Some),
        }
    }

    /// Stage 2: checks the neighbours' signed keys and returns one
    /// encrypted share pair per neighbour.
    pub fn handle_keys<R: RngCore + ?Sized>(
        &mut self,
        adverts: &[(Index, KeyAdvert)],
        rng: &mut R,
    ) -> Result<FromParticipant> {
        let stage = Stage::ShareKeys;
        self.expect(ParticipantStage::AwaitingKeys, stage)?;
        let mut keys = BTreeMap::new();
        for (index, advert) in adverts {
            if !self.session.is_neighbour(self.me, *index) {
                return Err(protocol(stage, format!("{index} is not a neighbour")));
            }
            let message = self.session.keys_message(
                *index,
                &advert.cipher_key,
                &advert.mask_key,
                &advert.seed_commitment,
            );
            self.session.participants[usize::from(*index)]
                .verify(KEYS_CONTEXT, &message, &advert.signature)
                .map_err(|_| {
                    protocol(stage, format!("the keys of {index} are not signed by it"))
                })?;
            let entry = NeighbourKeys {
                cipher: advert.cipher_key,
                mask: advert.mask_key,
            };
            if keys.insert(*index, entry).is_some() {
                return Err(protocol(stage, format!("the keys of {index} came twice")));
            }
        }
        let threshold = self.session.config.threshold;
        if keys.len() < usize::from(threshold) {
            return Err(protocol(
                stage,
                format!(
                    "{} neighbours advertised keys, {threshold} are needed to hold the shares",
                    keys.len()
                ),
            ));
        }
        let seed_shares = split_secret(&self.seed, threshold, keys.len(), rng);
        let mask_shares = split_secret(&self.mask_secret.to_bytes(), threshold, keys.len(), rng);
        let mut out = Vec::with_capacity(keys.len());
        for ((to, neighbour), (seed_share, mask_share)) in
            keys.iter().zip(seed_shares.iter().zip(mask_shares.iter()))
        {
            let shared = self
                .cipher_secret
                .diffie_hellman(&neighbour.cipher)
                .map_err(|e| protocol(stage, format!("the cipher key of {to}: {e}")))?;
            let key = self.session.share_key(&shared, self.me, *to);
            let mut plaintext = Zeroizing::new(Vec::with_capacity(2 * SHARE_LEN));
            plaintext.extend_from_slice(seed_share);
            plaintext.extend_from_slice(mask_share);
            // Each key encrypts exactly one message, so a fixed nonce is safe.
            let ciphertext = aead::encrypt(
                &key,
                &[0u8; aead::NONCE_LEN],
                &self.session.share_aad(self.me, *to),
                &plaintext,
            )
            .map_err(|e| protocol(stage, e.to_string()))?;
            out.push(EncryptedShare {
                from: self.me,
                to: *to,
                ciphertext,
            });
        }
        self.keys = keys;
        self.stage = ParticipantStage::AwaitingShares;
        Ok(FromParticipant::Shares(out))
    }

    /// Stage 2's result: opens and keeps the shares the neighbours sent.
    /// The participant then waits for its local update.
    pub fn handle_shares(&mut self, shares: &[EncryptedShare]) -> Result<()> {
        let stage = Stage::MaskedInput;
        self.expect(ParticipantStage::AwaitingShares, stage)?;
        let mut held = BTreeMap::new();
        for share in shares {
            let Some(neighbour) = self.keys.get(&share.from) else {
                return Err(protocol(
                    stage,
                    format!(
                        "a share from {}, which advertised no keys to us",
                        share.from
                    ),
                ));
            };
            if share.to != self.me || share.ciphertext.len() != ENCRYPTED_SHARE_LEN {
                return Err(protocol(
                    stage,
                    format!("a malformed share from {}", share.from),
                ));
            }
            let shared = self
                .cipher_secret
                .diffie_hellman(&neighbour.cipher)
                .map_err(|e| protocol(stage, e.to_string()))?;
            let key = self.session.share_key(&shared, share.from, self.me);
            let plaintext = aead::decrypt(
                &key,
                &[0u8; aead::NONCE_LEN],
                &self.session.share_aad(share.from, self.me),
                &share.ciphertext,
            )
            .map_err(|_| {
                protocol(
                    stage,
                    format!("the share from {} does not open", share.from),
                )
            })?;
            let (seed, mask_key) = plaintext.split_at(SHARE_LEN);
            check_share(stage, seed)?;
            check_share(stage, mask_key)?;
            let entry = HeldShares {
                seed: seed.to_vec(),
                mask_key: mask_key.to_vec(),
            };
            if held.insert(share.from, entry).is_some() {
                return Err(protocol(stage, format!("two shares from {}", share.from)));
            }
        }
        // Masking with fewer than k − t + 1 neighbours would leave t
        // neighbours outside the masks: a coordinator that withheld the
        // other shares could have those reveal the self-mask seed and strip
        // the few pairwise masks left.
        let threshold = usize::from(self.session.config.threshold);
        if held.len() + threshold <= self.keys.len() {
            return Err(protocol(
                stage,
                format!(
                    "shares from {} of {} neighbours; masking needs more than {}",
                    held.len(),
                    self.keys.len(),
                    self.keys.len() - threshold
                ),
            ));
        }
        self.held = held;
        self.stage = ParticipantStage::ReadyForInput;
        Ok(())
    }

    /// Whether the participant holds its neighbours' shares and waits for
    /// its update.
    pub fn wants_input(&self) -> bool {
        self.stage == ParticipantStage::ReadyForInput
    }

    /// Stage 3: quantises `update` and masks it with the self mask and the
    /// pairwise masks of every neighbour that shared.
    pub fn masked_input<R: Rng + ?Sized>(
        &mut self,
        update: &[f32],
        rng: &mut R,
    ) -> Result<FromParticipant> {
        let stage = Stage::MaskedInput;
        self.expect(ParticipantStage::ReadyForInput, stage)?;
        if update.len() != self.session.dimension {
            return Err(Error::LengthMismatch {
                client: None,
                expected: self.session.dimension,
                found: update.len(),
            });
        }
        let mut values = quantise(&self.session.config, update, rng)?;
        apply_mask(&mut values, &self.seed, false);
        for &neighbour in self.held.keys() {
            let keys = &self.keys[&neighbour];
            let shared = self
                .mask_secret
                .diffie_hellman(&keys.mask)
                .map_err(|e| protocol(stage, e.to_string()))?;
            let seed = self.session.pair_seed(&shared, self.me, neighbour);
            apply_mask(&mut values, &seed, self.me > neighbour);
        }
        self.stage = ParticipantStage::AwaitingSurvivors;
        Ok(FromParticipant::Masked(MaskedInput(values)))
    }

    /// Stage 4: signs the survivor list, once.
    pub fn handle_survivors(
        &mut self,
        survivors: &[Index],
        identity: &Identity,
    ) -> Result<FromParticipant> {
        let stage = Stage::ConsistencyCheck;
        self.expect(ParticipantStage::AwaitingSurvivors, stage)?;
        check_survivor_list(&self.session, survivors, stage)?;
        if !survivors.contains(&self.me) {
            return Err(protocol(
                stage,
                "the survivor list leaves out this participant",
            ));
        }
        self.survivors = survivors.to_vec();
        self.stage = ParticipantStage::AwaitingUnmask;
        let signature = identity.sign(
            SURVIVORS_CONTEXT,
            &self.session.survivors_message(survivors),
        );
        Ok(FromParticipant::Consistency(signature))
    }

    /// Stage 5: checks that the survivor list is the signed one and reveals,
    /// per neighbour that shared, the seed share of a survivor or the mask
    /// key share of a dropout.
    pub fn handle_unmask(&mut self, request: &UnmaskRequest) -> Result<FromParticipant> {
        let stage = Stage::Unmask;
        self.expect(ParticipantStage::AwaitingUnmask, stage)?;
        if request.survivors != self.survivors {
            return Err(protocol(
                stage,
                "the survivor list differs from the one this participant signed",
            ));
        }
        let message = self.session.survivors_message(&self.survivors);
        let mut signers = BTreeSet::new();
        if request.signatures.len() > self.survivors.len() {
            return Err(protocol(stage, "more signatures than survivors"));
        }
        for (index, signature) in &request.signatures {
            if self.survivors.binary_search(index).is_err() || signers.contains(index) {
                continue;
            }
            if self.session.participants[usize::from(*index)]
                .verify(SURVIVORS_CONTEXT, &message, signature)
                .is_ok()
            {
                signers.insert(*index);
            }
        }
        let needed = self.session.signatures_needed();
        if signers.len() < needed {
            return Err(protocol(
                stage,
                format!(
                    "{} survivors signed the list, {needed} are needed",
                    signers.len()
                ),
            ));
        }
        let mut out = Unmasking::default();
        for (owner, shares) in &self.held {
            if self.survivors.binary_search(owner).is_ok() {
                out.seed_shares.push((*owner, shares.seed.clone()));
            } else {
                out.mask_key_shares.push((*owner, shares.mask_key.clone()));
            }
        }
        self.stage = ParticipantStage::Done;
        Ok(FromParticipant::Unmask(out))
    }
}

fn check_survivor_list(session: &Session, survivors: &[Index], stage: Stage) -> Result<()> {
    if survivors.windows(2).any(|w| w[0] >= w[1])
        || survivors
            .last()
            .is_some_and(|&s| usize::from(s) >= session.participants.len())
    {
        return Err(protocol(
            stage,
            "the survivor list is not ascending and in range",
        ));
    }
    if survivors.len() < usize::from(session.config.min_survivors) {
        return Err(protocol(
            stage,
            format!(
                "{} survivors, the round needs {}",
                survivors.len(),
                session.config.min_survivors
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Coordinator
// ---------------------------------------------------------------------------

/// The unmasked sum of a round.
#[derive(Debug, Clone, PartialEq)]
pub struct SecAggResult {
    /// Who contributed to the sum, ascending.
    pub survivors: Vec<Index>,
    /// The sum of the survivors' quantised updates, on the ring.
    pub ring_sum: Vec<u32>,
    /// The same sum read back to floats.
    pub sum: Vec<f32>,
    /// The noise multiplier the sum carries relative to one update's
    /// sensitivity, for the accountant (`None` without distributed noise).
    pub charged_noise_multiplier: Option<f64>,
}

impl SecAggResult {
    /// The mean update: the sum over the number of survivors.
    pub fn mean(&self) -> Vec<f32> {
        let n = self.survivors.len().max(1) as f32;
        self.sum.iter().map(|v| v / n).collect()
    }
}

/// What the coordinator's state machine asks the node to do.
#[derive(Debug, Clone, PartialEq)]
pub enum CoordinatorOutput {
    /// Send `message` to participant `to`.
    Send {
        /// The recipient's index.
        to: Index,
        /// What to send.
        message: ToParticipant,
    },
    /// The round closed with this sum.
    Finished(SecAggResult),
    /// The round cannot close; nothing about any update was learnt.
    Failed {
        /// The stage it failed at.
        stage: Stage,
        /// Why, for the operator.
        reason: String,
    },
}

/// The coordinator's side of one secure-aggregation round, as a sans-IO
/// state machine: [`SecAggCoordinator::handle_message`] and
/// [`SecAggCoordinator::handle_tick`] in, [`SecAggCoordinator::poll_output`]
/// and [`SecAggCoordinator::poll_timeout`] out.
///
/// Memory is bounded by the session: masked inputs are added into one
/// running sum as they arrive (one vector, not one per participant), and
/// every other message is checked for size and sender before it is kept.
pub struct SecAggCoordinator {
    session: Session,
    stage: Stage,
    deadline_ms: u64,
    adverts: BTreeMap<Index, KeyAdvert>,
    shares: BTreeMap<Index, Vec<EncryptedShare>>,
    masked_sum: Vec<u32>,
    masked: BTreeSet<Index>,
    survivors: Vec<Index>,
    signatures: BTreeMap<Index, Signature>,
    unmask_responders: BTreeSet<Index>,
    seed_shares: BTreeMap<Index, Vec<Vec<u8>>>,
    mask_key_shares: BTreeMap<Index, Vec<Vec<u8>>>,
    outputs: VecDeque<CoordinatorOutput>,
}

impl std::fmt::Debug for SecAggCoordinator {
    // Not the running sum: it can hold millions of coordinates.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggCoordinator")
            .field("stage", &self.stage)
            .field("deadline_ms", &self.deadline_ms)
            .field("advertised", &self.adverts.len())
            .field("shared", &self.shares.len())
            .field("survivors", &self.survivors.len())
            .finish_non_exhaustive()
    }
}

impl SecAggCoordinator {
    /// Opens stage 1 at `now_ms`.
    pub fn new(session: Session, now_ms: u64) -> Self {
        let deadline_ms = now_ms.saturating_add(session.config.stage_timeout_ms);
        let dimension = session.dimension;
        SecAggCoordinator {
            session,
            stage: Stage::Advertise,
            deadline_ms,
            adverts: BTreeMap::new(),
            shares: BTreeMap::new(),
            masked_sum: vec![0; dimension],
            masked: BTreeSet::new(),
            survivors: Vec::new(),
            signatures: BTreeMap::new(),
            unmask_responders: BTreeSet::new(),
            seed_shares: BTreeMap::new(),
            mask_key_shares: BTreeMap::new(),
            outputs: VecDeque::new(),
        }
    }

    /// Restarts the first stage's clock at `now_ms`: the node opens the
    /// session when it submits the round's start, and participants can
    /// only answer once that start has committed.
    pub fn restart_first_stage(&mut self, now_ms: u64) {
        if self.stage == Stage::Advertise {
            self.deadline_ms = now_ms.saturating_add(self.session.config.stage_timeout_ms);
        }
    }

    /// The stage the round is in.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The session this round runs.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<CoordinatorOutput> {
        self.outputs.pop_front()
    }

    /// When [`SecAggCoordinator::handle_tick`] must be called next.
    pub fn poll_timeout(&self) -> Option<u64> {
        (self.stage != Stage::Done).then_some(self.deadline_ms)
    }

    /// Closes the current stage if its deadline has passed.
    pub fn handle_tick(&mut self, now_ms: u64) {
        if self.stage != Stage::Done && now_ms >= self.deadline_ms {
            self.advance(now_ms);
        }
    }

    /// Takes one participant's message. An error names what was wrong
    /// with it; the message was not kept, and the node may penalise the
    /// sender.
    pub fn handle_message(
        &mut self,
        from: Index,
        message: FromParticipant,
        now_ms: u64,
    ) -> Result<()> {
        if usize::from(from) >= self.session.participants.len() {
            return Err(protocol(self.stage, format!("{from} is not a participant")));
        }
        let complete = match message {
            FromParticipant::Advertise(advert) => self.handle_advert(from, advert)?,
            FromParticipant::Shares(shares) => self.handle_shares(from, shares)?,
            FromParticipant::Masked(values) => self.handle_masked(from, &values.0)?,
            FromParticipant::Consistency(signature) => self.handle_consistency(from, signature)?,
            FromParticipant::Unmask(unmasking) => self.handle_unmasking(from, unmasking)?,
        };
        if complete {
            self.advance(now_ms);
        }
        Ok(())
    }

    fn expect(&self, stage: Stage, from: Index) -> Result<()> {
        if self.stage != stage {
            return Err(protocol(
                stage,
                format!(
                    "{from} answered while the round is at {}",
                    self.stage.as_str()
                ),
            ));
        }
        Ok(())
    }

    fn handle_advert(&mut self, from: Index, advert: KeyAdvert) -> Result<bool> {
        let stage = Stage::Advertise;
        self.expect(stage, from)?;
        if self.adverts.contains_key(&from) {
            return Err(protocol(stage, format!("{from} advertised twice")));
        }
        let message = self.session.keys_message(
            from,
            &advert.cipher_key,
            &advert.mask_key,
            &advert.seed_commitment,
        );
        self.session.participants[usize::from(from)]
            .verify(KEYS_CONTEXT, &message, &advert.signature)
            .map_err(|_| protocol(stage, format!("the keys of {from} are not signed by it")))?;
        // A low-order key would make every neighbour's agreement fail after
        // it committed to the round: refuse it here, before it is forwarded.
        let probe = X25519Secret::from_bytes([0x5a; 32]);
        if probe.diffie_hellman(&advert.cipher_key).is_err()
            || probe.diffie_hellman(&advert.mask_key).is_err()
        {
            return Err(protocol(
                stage,
                format!("{from} advertised a low-order key"),
            ));
        }
        self.adverts.insert(from, advert);
        Ok(self.adverts.len() == self.session.participants.len())
    }

    fn handle_shares(&mut self, from: Index, shares: Vec<EncryptedShare>) -> Result<bool> {
        let stage = Stage::ShareKeys;
        self.expect(stage, from)?;
        if !self.adverts.contains_key(&from) || self.shares.contains_key(&from) {
            return Err(protocol(stage, format!("{from} may not send shares now")));
        }
        let mut recipients = BTreeSet::new();
        for share in &shares {
            let valid = share.from == from
                && self.adverts.contains_key(&share.to)
                && self.session.is_neighbour(from, share.to)
                && share.ciphertext.len() == ENCRYPTED_SHARE_LEN
                && recipients.insert(share.to);
            if !valid {
                return Err(protocol(stage, format!("{from} sent a malformed share")));
            }
        }
        // A participant must share with every neighbour that advertised:
        // a neighbour left out would not mask with it while it masks with
        // the neighbour, and the masks would not cancel.
        let expected: BTreeSet<Index> = self
            .session
            .neighbours(from)
            .into_iter()
            .filter(|v| self.adverts.contains_key(v))
            .collect();
        if recipients != expected {
            return Err(protocol(
                stage,
                format!("{from} did not send a share to each advertised neighbour"),
            ));
        }
        self.shares.insert(from, shares);
        Ok(self.shares.len() == self.adverts.len())
    }

    fn handle_masked(&mut self, from: Index, values: &[u32]) -> Result<bool> {
        let stage = Stage::MaskedInput;
        self.expect(stage, from)?;
        if !self.shares.contains_key(&from) || self.masked.contains(&from) {
            return Err(protocol(
                stage,
                format!("{from} may not send a masked input now"),
            ));
        }
        if values.len() != self.session.dimension {
            return Err(Error::LengthMismatch {
                client: None,
                expected: self.session.dimension,
                found: values.len(),
            });
        }
        for (acc, v) in self.masked_sum.iter_mut().zip(values) {
            *acc = acc.wrapping_add(*v);
        }
        self.masked.insert(from);
        Ok(self.masked.len() == self.shares.len())
    }

    fn handle_consistency(&mut self, from: Index, signature: Signature) -> Result<bool> {
        let stage = Stage::ConsistencyCheck;
        self.expect(stage, from)?;
        if self.survivors.binary_search(&from).is_err() || self.signatures.contains_key(&from) {
            return Err(protocol(stage, format!("{from} may not sign now")));
        }
        let message = self.session.survivors_message(&self.survivors);
        self.session.participants[usize::from(from)]
            .verify(SURVIVORS_CONTEXT, &message, &signature)
            .map_err(|_| protocol(stage, format!("{from} signed another survivor list")))?;
        self.signatures.insert(from, signature);
        Ok(self.signatures.len() == self.survivors.len())
    }

    fn handle_unmasking(&mut self, from: Index, unmasking: Unmasking) -> Result<bool> {
        let stage = Stage::Unmask;
        self.expect(stage, from)?;
        if !self.signatures.contains_key(&from) || self.unmask_responders.contains(&from) {
            return Err(protocol(stage, format!("{from} may not reveal shares now")));
        }
        // Check everything before keeping anything.
        let mut owners = BTreeSet::new();
        for (owner, share) in &unmasking.seed_shares {
            let survived = self.survivors.binary_search(owner).is_ok();
            if !survived || !self.holds_share_of(from, *owner) || !owners.insert(*owner) {
                return Err(protocol(
                    stage,
                    format!("{from} revealed a seed share it may not"),
                ));
            }
            check_share(stage, share)?;
        }
        for (owner, share) in &unmasking.mask_key_shares {
            let dropped = self.survivors.binary_search(owner).is_err();
            if !dropped || !self.holds_share_of(from, *owner) || !owners.insert(*owner) {
                return Err(protocol(
                    stage,
                    format!("{from} revealed a key share it may not"),
                ));
            }
            check_share(stage, share)?;
        }
        for (owner, share) in unmasking.seed_shares {
            self.seed_shares.entry(owner).or_default().push(share);
        }
        for (owner, share) in unmasking.mask_key_shares {
            self.mask_key_shares.entry(owner).or_default().push(share);
        }
        self.unmask_responders.insert(from);
        Ok(self.unmask_responders.len() == self.signatures.len())
    }

    /// The survivors that received `owner`'s shares in stage 2: its
    /// neighbours only, so this costs `k`, not the round's size.
    fn surviving_holders(&self, owner: Index) -> impl Iterator<Item = Index> + '_ {
        self.shares
            .get(&owner)
            .into_iter()
            .flatten()
            .map(|share| share.to)
            .filter(|v| self.survivors.binary_search(v).is_ok())
    }

    /// Whether `holder` received `owner`'s shares in stage 2.
    fn holds_share_of(&self, holder: Index, owner: Index) -> bool {
        self.shares
            .get(&owner)
            .is_some_and(|shares| shares.iter().any(|s| s.to == holder))
    }

    fn fail(&mut self, reason: String) {
        self.outputs.push_back(CoordinatorOutput::Failed {
            stage: self.stage,
            reason,
        });
        self.stage = Stage::Done;
        self.masked_sum = Vec::new();
    }

    fn open_stage(&mut self, stage: Stage, now_ms: u64) {
        self.stage = stage;
        self.deadline_ms = now_ms.saturating_add(self.session.config.stage_timeout_ms);
    }

    fn enough(&mut self, answered: usize, what: &str) -> bool {
        let min = usize::from(self.session.config.min_survivors);
        if answered < min {
            self.fail(format!(
                "{answered} participants {what}, the round needs {min}"
            ));
            return false;
        }
        true
    }

    fn advance(&mut self, now_ms: u64) {
        match self.stage {
            Stage::Advertise => {
                if !self.enough(self.adverts.len(), "advertised keys") {
                    return;
                }
                for &u in self.adverts.keys() {
                    let keys = self
                        .session
                        .neighbours(u)
                        .into_iter()
                        .filter_map(|v| self.adverts.get(&v).map(|a| (v, a.clone())))
                        .collect();
                    self.outputs.push_back(CoordinatorOutput::Send {
                        to: u,
                        message: ToParticipant::Keys(keys),
                    });
                }
                self.open_stage(Stage::ShareKeys, now_ms);
            }
            Stage::ShareKeys => {
                if !self.enough(self.shares.len(), "sent shares") {
                    return;
                }
                let mut inbox: BTreeMap<Index, Vec<EncryptedShare>> =
                    self.shares.keys().map(|&v| (v, Vec::new())).collect();
                for share in self.shares.values().flatten() {
                    if let Some(list) = inbox.get_mut(&share.to) {
                        list.push(share.clone());
                    }
                }
                for (to, shares) in inbox {
                    self.outputs.push_back(CoordinatorOutput::Send {
                        to,
                        message: ToParticipant::Shares(shares),
                    });
                }
                self.open_stage(Stage::MaskedInput, now_ms);
            }
            Stage::MaskedInput => {
                if !self.enough(self.masked.len(), "sent a masked input") {
                    return;
                }
                self.survivors = self.masked.iter().copied().collect();
                // Every participant that shared needs t holders of its
                // shares among the survivors, or its masks stay in the sum.
                let threshold = usize::from(self.session.config.threshold);
                let short = self
                    .shares
                    .keys()
                    .copied()
                    .find(|&owner| self.surviving_holders(owner).count() < threshold);
                if let Some(owner) = short {
                    self.fail(format!(
                        "fewer than {threshold} survivors hold the shares of {owner}"
                    ));
                    return;
                }
                for &v in &self.survivors {
                    self.outputs.push_back(CoordinatorOutput::Send {
                        to: v,
                        message: ToParticipant::Survivors(self.survivors.clone()),
                    });
                }
                self.open_stage(Stage::ConsistencyCheck, now_ms);
            }
            Stage::ConsistencyCheck => {
                let needed = self.session.signatures_needed();
                if self.signatures.len() < needed {
                    let got = self.signatures.len();
                    self.fail(format!(
                        "{got} survivors signed their list, {needed} are needed"
                    ));
                    return;
                }
                let request = UnmaskRequest {
                    survivors: self.survivors.clone(),
                    signatures: self.signatures.iter().map(|(&i, &s)| (i, s)).collect(),
                };
                for &v in self.signatures.keys() {
                    self.outputs.push_back(CoordinatorOutput::Send {
                        to: v,
                        message: ToParticipant::Unmask(request.clone()),
                    });
                }
                self.open_stage(Stage::Unmask, now_ms);
            }
            Stage::Unmask => self.unmask(),
            Stage::Done => {}
        }
    }

    fn unmask(&mut self) {
        let threshold = self.session.config.threshold;
        let mut sum = std::mem::take(&mut self.masked_sum);
        let survivors = self.survivors.clone();
        for &u in &survivors {
            let shares = self.seed_shares.get(&u).map(Vec::as_slice).unwrap_or(&[]);
            let seed = (shares.len() >= usize::from(threshold))
                .then(|| recover_secret(threshold, shares))
                .flatten();
            let Some(seed) = seed
                .filter(|s| self.session.seed_commitment(u, s) == self.adverts[&u].seed_commitment)
            else {
                let got = shares.len();
                self.fail(format!(
                    "the self-mask seed of {u} did not reconstruct from {got} shares"
                ));
                return;
            };
            apply_mask(&mut sum, &seed, true);
        }
        let dropped: Vec<Index> = self
            .shares
            .keys()
            .copied()
            .filter(|u| self.survivors.binary_search(u).is_err())
            .collect();
        for u in dropped {
            let shares = self
                .mask_key_shares
                .get(&u)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let secret = (shares.len() >= usize::from(threshold))
                .then(|| recover_secret(threshold, shares))
                .flatten()
                .map(|bytes| X25519Secret::from_bytes(*bytes))
                .filter(|secret| secret.public() == self.adverts[&u].mask_key);
            let Some(secret) = secret else {
                let got = shares.len();
                self.fail(format!(
                    "the mask key of dropped participant {u} did not reconstruct from {got} shares"
                ));
                return;
            };
            // Remove the pairwise masks the survivors added for u: v masked
            // with u if v received u's share.
            let holders: Vec<Index> = self.surviving_holders(u).collect();
            for v in holders {
                let Ok(shared) = secret.diffie_hellman(&self.adverts[&v].mask_key) else {
                    self.fail(format!("the mask key of {v} is degenerate"));
                    return;
                };
                let seed = self.session.pair_seed(&shared, u, v);
                // v added the mask when v < u and subtracted it otherwise;
                // undo what it did.
                apply_mask(&mut sum, &seed, v < u);
            }
        }
        let config = self.session.config;
        let charged_noise_multiplier = config.noise.map(|noise| {
            config.charged_noise_multiplier(noise, survivors.len(), self.session.dimension)
        });
        let result = SecAggResult {
            survivors,
            sum: dequantise(&config, &sum),
            ring_sum: sum,
            charged_noise_multiplier,
        };
        self.outputs.push_back(CoordinatorOutput::Finished(result));
        self.stage = Stage::Done;
    }
}

// ---------------------------------------------------------------------------
// A whole round in one process
// ---------------------------------------------------------------------------

/// Watches a round [`run_in_process`] drives: each party's work and each
/// message, for a benchmark's clock and byte counts (this crate reads no
/// clock). Every method defaults to running the work and nothing else.
pub trait RoundObserver {
    /// Runs the coordinator's `work`.
    fn coordinator<T>(&mut self, work: impl FnOnce() -> T) -> T {
        work()
    }
    /// Runs participant `index`'s `work`.
    fn participant<T>(&mut self, index: usize, work: impl FnOnce() -> T) -> T {
        let _ = index;
        work()
    }
    /// Participant `index` sent `message`.
    fn sent(&mut self, index: usize, message: &FromParticipant) {
        let _ = (index, message);
    }
    /// The coordinator sent participant `index` `message` (also after it
    /// dropped out).
    fn received(&mut self, index: usize, message: &ToParticipant) {
        let _ = (index, message);
    }
}

/// A [`RoundObserver`] that only runs the work.
pub struct Unobserved;

impl RoundObserver for Unobserved {}

/// Runs one secure-aggregation round with the coordinator and every
/// participant in this process, as the state machines a networked round
/// uses, for simulations and benchmarks. `identities` and `inputs` are in
/// the session's participant order; a participant with `dropped[i]`
/// vanishes after it received the others' keys (the costly case: its masks
/// are reconstructed). A stage closes as soon as nobody else will answer.
/// Fails as the coordinator would: too many dropouts end the round with an
/// error and no sum.
pub fn run_in_process<R: RngCore + ?Sized, O: RoundObserver>(
    session: &Session,
    identities: &[Identity],
    inputs: &[Vec<f32>],
    dropped: &[bool],
    rng: &mut R,
    observer: &mut O,
) -> Result<SecAggResult> {
    let n = session.participants().len();
    if identities.len() != n || inputs.len() != n || dropped.len() != n {
        return Err(Error::invalid(
            "in-process round",
            format!(
                "{n} participants need {n} identities, inputs and dropout flags (got {}, {}, {})",
                identities.len(),
                inputs.len(),
                dropped.len()
            ),
        ));
    }
    let mut coordinator = observer.coordinator(|| SecAggCoordinator::new(session.clone(), 0));
    let mut parts = Vec::with_capacity(n);
    let mut inbox: VecDeque<(Index, FromParticipant)> = VecDeque::new();
    for (i, id) in identities.iter().enumerate() {
        let (part, advert) =
            observer.participant(i, || SecAggParticipant::new(session.clone(), id, rng))?;
        observer.sent(i, &advert);
        parts.push(part);
        inbox.push_back((i as Index, advert));
    }
    loop {
        while let Some((from, message)) = inbox.pop_front() {
            observer.coordinator(|| coordinator.handle_message(from, message, 0))?;
        }
        let Some(output) = observer.coordinator(|| coordinator.poll_output()) else {
            // Everyone who will answer has: the stage's deadline passes.
            let deadline = coordinator
                .poll_timeout()
                .ok_or_else(|| protocol(coordinator.stage(), "stalled without a deadline"))?;
            observer.coordinator(|| coordinator.handle_tick(deadline));
            continue;
        };
        match output {
            CoordinatorOutput::Send { to, message } => {
                let i = usize::from(to);
                observer.received(i, &message);
                let gone = dropped[i] && !matches!(message, ToParticipant::Keys(_));
                let (Some(part), Some(id), Some(input)) =
                    (parts.get_mut(i), identities.get(i), inputs.get(i))
                else {
                    continue;
                };
                if gone {
                    continue;
                }
                let reply = observer.participant(i, || -> Result<Option<FromParticipant>> {
                    let reply = part.handle_message(message, id, rng)?;
                    if reply.is_none() && part.wants_input() {
                        return part.masked_input(input, rng).map(Some);
                    }
                    Ok(reply)
                })?;
                if let Some(reply) = reply {
                    observer.sent(i, &reply);
                    inbox.push_back((to, reply));
                }
            }
            CoordinatorOutput::Finished(result) => return Ok(result),
            CoordinatorOutput::Failed { stage, reason } => return Err(protocol(stage, reason)),
        }
    }
}

/// The ChaCha20 the Shamir dealer draws from: `blahaj` takes a rand 0.10
/// RNG, this crate otherwise uses rand 0.9.
mod share_rng {
    use rand_chacha_shares::rand_core::SeedableRng;

    pub fn from_seed(seed: [u8; 32]) -> rand_chacha_shares::ChaCha20Rng {
        rand_chacha_shares::ChaCha20Rng::from_seed(seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng_from_seed;

    fn config(neighbours: u16, threshold: u16, min_survivors: u16) -> SecAggConfig {
        SecAggConfig {
            neighbours,
            threshold,
            min_survivors,
            clip_range: 4.0,
            quant_bits: DEFAULT_QUANT_BITS,
            stage_timeout_ms: 1_000,
            noise: None,
        }
    }

    fn identities(n: usize) -> Vec<Identity> {
        (0..n)
            .map(|i| Identity::from_seed(&[i as u8 + 1; 32]))
            .collect()
    }

    /// One round between a coordinator and `n` participants, the messages
    /// carried in order and participants dropping out from a given stage
    /// on (they never answer again).
    struct Net {
        ids: Vec<Identity>,
        parts: Vec<Option<SecAggParticipant>>,
        coord: SecAggCoordinator,
        now: u64,
        rng: crate::SeededRng,
        drop_at: BTreeMap<Index, Stage>,
        updates: Vec<Vec<f32>>,
        masked_seen: BTreeMap<Index, Vec<u32>>,
        outcome: Option<CoordinatorOutput>,
    }

    impl Net {
        fn new(
            config: SecAggConfig,
            updates: Vec<Vec<f32>>,
            drop_at: &[(Index, Stage)],
            seed: u8,
        ) -> Net {
            let n = updates.len();
            let ids = identities(n);
            let session = Session::new(
                config,
                [seed; 32],
                ids.iter().map(Identity::public).collect(),
                updates[0].len(),
            )
            .expect("valid session");
            let mut rng = rng_from_seed([seed; 32]);
            let mut net = Net {
                parts: Vec::new(),
                coord: SecAggCoordinator::new(session.clone(), 0),
                now: 0,
                drop_at: drop_at.iter().copied().collect(),
                updates,
                masked_seen: BTreeMap::new(),
                outcome: None,
                ids: Vec::new(),
                rng: rng_from_seed([seed ^ 0xff; 32]),
            };
            for (i, id) in ids.iter().enumerate() {
                let (part, advert) =
                    SecAggParticipant::new(session.clone(), id, &mut rng).expect("participant");
                net.parts.push(Some(part));
                net.reply(i as Index, Stage::Advertise, advert);
            }
            net.ids = ids;
            net
        }

        fn answers(&self, i: Index, stage: Stage) -> bool {
            self.drop_at.get(&i).is_none_or(|&from| stage < from)
        }

        fn reply(&mut self, i: Index, stage: Stage, message: FromParticipant) {
            if !self.answers(i, stage) {
                return;
            }
            if let FromParticipant::Masked(values) = &message {
                self.masked_seen.insert(i, values.0.clone());
            }
            self.coord
                .handle_message(i, message, self.now)
                .expect("an honest participant's message is accepted");
        }

        /// Carries one coordinator output; false when there was none.
        fn step(&mut self) -> bool {
            let Some(output) = self.coord.poll_output() else {
                return false;
            };
            match output {
                CoordinatorOutput::Send { to, message } => self.deliver(to, message),
                done => self.outcome = Some(done),
            }
            true
        }

        fn deliver(&mut self, to: Index, message: ToParticipant) {
            let stage = match &message {
                ToParticipant::Keys(_) => Stage::ShareKeys,
                ToParticipant::Shares(_) => Stage::MaskedInput,
                ToParticipant::Survivors(_) => Stage::ConsistencyCheck,
                ToParticipant::Unmask(_) => Stage::Unmask,
            };
            if !self.answers(to, stage) {
                return;
            }
            let part = self.parts[usize::from(to)].as_mut().expect("participant");
            let id = &self.ids[usize::from(to)];
            let reply = part
                .handle_message(message, id, &mut self.rng)
                .expect("an honest coordinator's message is accepted");
            if let Some(reply) = reply {
                self.reply(to, stage, reply);
            } else if part.wants_input() {
                let update = self.updates[usize::from(to)].clone();
                let masked = part
                    .masked_input(&update, &mut self.rng)
                    .expect("masked input");
                self.reply(to, Stage::MaskedInput, masked);
            }
        }

        fn run_until(&mut self, stage: Stage) {
            while self.coord.stage() < stage {
                if !self.step() {
                    let deadline = self.coord.poll_timeout().expect("a stage is open");
                    self.now = deadline;
                    self.coord.handle_tick(self.now);
                }
            }
        }

        fn run(mut self) -> CoordinatorOutput {
            self.run_until(Stage::Done);
            while self.step() {}
            self.outcome.expect("the round ended")
        }
    }

    fn random_updates(n: usize, dim: usize, seed: u8) -> Vec<Vec<f32>> {
        let mut rng = rng_from_seed([seed; 32]);
        (0..n)
            .map(|_| (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect())
            .collect()
    }

    fn plain_sum(updates: &[Vec<f32>], who: &[Index]) -> Vec<f64> {
        let mut sum = vec![0.0f64; updates[0].len()];
        for &i in who {
            for (s, v) in sum.iter_mut().zip(&updates[usize::from(i)]) {
                *s += f64::from(*v);
            }
        }
        sum
    }

    fn finished(output: CoordinatorOutput) -> SecAggResult {
        match output {
            CoordinatorOutput::Finished(result) => result,
            other => panic!("the round did not finish: {other:?}"),
        }
    }

    fn assert_close(config: &SecAggConfig, result: &SecAggResult, expected: &[f64]) {
        // Stochastic rounding moves each input by less than one unit.
        let bound = result.survivors.len() as f64 / config.scale() + 1e-5;
        for (i, (got, want)) in result.sum.iter().zip(expected).enumerate() {
            assert!(
                (f64::from(*got) - want).abs() <= bound,
                "coordinate {i}: {got} against {want} (bound {bound})"
            );
        }
    }

    #[test]
    fn the_unmasked_sum_is_the_plain_sum_within_quantisation_error() {
        for seed in 0..3 {
            let config = config(4, 3, 5);
            let updates = random_updates(10, 1_000, seed);
            let result = finished(Net::new(config, updates.clone(), &[], seed).run());
            let everyone: Vec<Index> = (0..10).collect();
            assert_eq!(result.survivors, everyone);
            assert_close(&config, &result, &plain_sum(&updates, &everyone));
            assert_eq!(result.charged_noise_multiplier, None);
        }
    }

    #[test]
    fn dropouts_at_every_stage_are_tolerated() {
        let config = config(8, 5, 10);
        let updates = random_updates(20, 500, 7);
        let drops = [
            (0, Stage::Advertise),
            (5, Stage::ShareKeys),
            (10, Stage::MaskedInput),
            (15, Stage::ConsistencyCheck),
            (18, Stage::Unmask),
        ];
        let result = finished(Net::new(config, updates.clone(), &drops, 7).run());
        // 15 and 18 sent their masked inputs before dropping: they are in
        // the sum; 10 shared its keys and dropped: its masks were removed.
        let survivors: Vec<Index> = (0..20).filter(|i| ![0, 5, 10].contains(i)).collect();
        assert_eq!(result.survivors, survivors);
        assert_close(&config, &result, &plain_sum(&updates, &survivors));
    }

    #[test]
    fn the_complete_graph_is_used_for_small_rounds() {
        // Three neighbours each, so t = 2 tolerates one dropout.
        let config = config(8, 2, 3);
        let updates = random_updates(4, 64, 3);
        let net = Net::new(config, updates.clone(), &[(2, Stage::MaskedInput)], 3);
        assert_eq!(net.coord.session().neighbours(0), vec![1, 2, 3]);
        let result = finished(net.run());
        assert_eq!(result.survivors, vec![0, 1, 3]);
        assert_close(&config, &result, &plain_sum(&updates, &[0, 1, 3]));
    }

    #[test]
    fn a_round_below_its_threshold_fails_at_the_deadline() {
        // Too few masked inputs for min_survivors.
        let updates = random_updates(6, 32, 1);
        let drops = [
            (1, Stage::MaskedInput),
            (3, Stage::MaskedInput),
            (5, Stage::MaskedInput),
        ];
        let mut net = Net::new(config(4, 3, 4), updates.clone(), &drops, 1);
        net.run_until(Stage::MaskedInput);
        while net.step() {}
        // Three masked inputs are in and three never come: the round waits
        // for its deadline, no longer.
        assert_eq!(net.coord.stage(), Stage::MaskedInput);
        let deadline = net.coord.poll_timeout().expect("a deadline");
        net.coord.handle_tick(deadline - 1);
        assert_eq!(net.coord.stage(), Stage::MaskedInput);
        net.coord.handle_tick(deadline);
        assert_eq!(net.coord.stage(), Stage::Done);
        assert_eq!(net.coord.poll_timeout(), None);
        match net.coord.poll_output() {
            Some(CoordinatorOutput::Failed { stage, reason }) => {
                assert_eq!(stage, Stage::MaskedInput);
                assert!(
                    reason.contains("3 participants sent a masked input"),
                    "{reason}"
                );
            }
            other => panic!("expected a failure, got {other:?}"),
        }

        // Enough survivors, but too few of them reveal shares: with k = 4
        // and t = 3, participant 2 loses three of its four share holders.
        let drops = [(1, Stage::Unmask), (3, Stage::Unmask), (4, Stage::Unmask)];
        let output = Net::new(config(4, 3, 4), updates, &drops, 1).run();
        match output {
            CoordinatorOutput::Failed { stage, reason } => {
                assert_eq!(stage, Stage::Unmask);
                assert!(reason.contains("did not reconstruct"), "{reason}");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn fewer_than_t_shares_are_consistent_with_every_secret() {
        let mut rng = rng_from_seed([9; 32]);
        for threshold in [2u16, 3, 5] {
            for secret in [[0u8; 32], [0xa5; 32]] {
                let shares = split_secret(&secret, threshold, 8, &mut rng);
                assert_eq!(
                    recover_secret(threshold, &shares[..usize::from(threshold)]).as_deref(),
                    Some(&secret)
                );
                // t − 1 real shares plus a forged t-th: as its first y byte
                // runs over all 256 values, the reconstructed first byte of
                // the secret runs over all 256 values, once each. The t − 1
                // shares rule out no secret, whatever the real one was.
                let known = &shares[..usize::from(threshold) - 1];
                let mut reached = BTreeSet::new();
                for y in 0..=255u8 {
                    let mut forged = shares[usize::from(threshold)].clone();
                    forged[1] = y;
                    let mut set = known.to_vec();
                    set.push(forged);
                    let recovered = recover_secret(threshold, &set).expect("recovers");
                    reached.insert(recovered[0]);
                }
                assert_eq!(reached.len(), 256, "threshold {threshold}");
            }
        }
    }

    /// χ² statistic of the top four bits of `values` against uniform.
    fn chi_square_top_bits(values: &[u32]) -> f64 {
        let mut counts = [0usize; 16];
        for v in values {
            counts[(v >> 28) as usize] += 1;
        }
        let expected = values.len() as f64 / 16.0;
        counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum()
    }

    #[test]
    fn the_coordinators_view_of_one_update_is_uniform_whatever_the_input() {
        // Extreme inputs: every coordinate at −c, or at +c. Quantised, they
        // would sit in two single buckets of the top bits; masked, each
        // participant's vector must look uniform on the ring either way
        // (χ² with 15 degrees of freedom: 37.7 is the 0.1 % tail).
        for value in [-4.0f32, 4.0] {
            let updates = vec![vec![value; 8_192]; 6];
            let mut net = Net::new(config(4, 3, 4), updates.clone(), &[], 11);
            net.run_until(Stage::ConsistencyCheck);
            assert_eq!(net.masked_seen.len(), 6);
            for (i, masked) in &net.masked_seen {
                let chi = chi_square_top_bits(masked);
                assert!(chi < 37.7, "participant {i}, input {value}: χ² {chi}");
            }
            let quantised = quantise(&config(4, 3, 4), &updates[0], &mut rng_from_seed([0; 32]))
                .expect("quantises");
            assert!(chi_square_top_bits(&quantised) > 100_000.0);
        }
    }

    #[test]
    fn a_coordinator_that_equivocates_about_survivors_gets_no_shares() {
        let updates = random_updates(5, 16, 4);
        let mut net = Net::new(config(4, 3, 3), updates, &[], 4);
        net.run_until(Stage::ConsistencyCheck);
        let honest = net.coord.survivors.clone();
        assert_eq!(honest, vec![0, 1, 2, 3, 4]);
        // Participant 0 is told everyone survived, participant 1 that 4
        // dropped: each signs what it was told.
        let ids = identities(5);
        let mut signatures = Vec::new();
        for (i, list) in [(0usize, honest.clone()), (1, vec![0, 1, 2, 3])] {
            let part = net.parts[i].as_mut().expect("participant");
            match part.handle_survivors(&list, &ids[i]).expect("signs") {
                FromParticipant::Consistency(sig) => signatures.push((i as Index, sig)),
                other => panic!("{other:?}"),
            }
        }
        // A list only participant 0 signed is not enough for participant 0
        // to reveal anything.
        let request = UnmaskRequest {
            survivors: honest.clone(),
            signatures: signatures.clone(),
        };
        let part0 = net.parts[0].as_mut().expect("participant");
        let err = part0.handle_unmask(&request).expect_err("one signature");
        assert!(
            err.to_string()
                .contains("1 survivors signed the list, 3 are needed"),
            "{err}"
        );
        // Participant 1 never reveals for a list other than the one it
        // signed, whatever signatures come with it.
        let part1 = net.parts[1].as_mut().expect("participant");
        let err = part1.handle_unmask(&request).expect_err("another list");
        assert!(err.to_string().contains("differs"), "{err}");
        // And a signature for one list does not count for another.
        assert!(
            net.coord
                .handle_message(1, FromParticipant::Consistency(signatures[1].1), 0)
                .is_err()
        );
    }

    #[test]
    fn two_survivor_lists_cannot_both_be_approved() {
        // Seven participants, complete graph. The coordinator tells 0–3
        // that everyone survived and 4–6 that 1, 2 and 3 dropped (so it
        // would get 4–6 to reveal the mask keys of 1–3, whose seeds 0–3
        // reveal). Each group signs what it was told; only a list with
        // more than half of all seven participants' signatures opens.
        let updates = random_updates(7, 16, 8);
        let mut net = Net::new(config(6, 4, 4), updates, &[], 8);
        net.run_until(Stage::ConsistencyCheck);
        let everyone: Vec<Index> = (0..7).collect();
        let fewer: Vec<Index> = vec![0, 4, 5, 6];
        let ids = identities(7);
        let mut signed = [Vec::new(), Vec::new()];
        for (i, id) in ids.iter().enumerate() {
            let (list, group) = if i < 4 { (&everyone, 0) } else { (&fewer, 1) };
            let part = net.parts[i].as_mut().expect("participant");
            match part.handle_survivors(list, id).expect("signs") {
                FromParticipant::Consistency(sig) => signed[group].push((i as Index, sig)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(net.coord.session().signatures_needed(), 4);
        let request = UnmaskRequest {
            survivors: fewer.clone(),
            signatures: signed[1].clone(),
        };
        let part = net.parts[4].as_mut().expect("participant");
        let err = part.handle_unmask(&request).expect_err("three of seven");
        assert!(
            err.to_string()
                .contains("3 survivors signed the list, 4 are needed"),
            "{err}"
        );
        // Padding with the same signature twice does not help.
        let mut padded = request.clone();
        padded.signatures.push(signed[1][0]);
        let part = net.parts[5].as_mut().expect("participant");
        assert!(part.handle_unmask(&padded).is_err());
        // The list four signed opens, for those four only.
        let request = UnmaskRequest {
            survivors: everyone,
            signatures: signed[0].clone(),
        };
        let part = net.parts[0].as_mut().expect("participant");
        assert!(part.handle_unmask(&request).is_ok());
    }

    #[test]
    fn a_participant_does_not_mask_with_too_few_neighbours() {
        // The coordinator withholds every share from participant 0 but
        // forwards 0's shares: 0 would mask with its self mask alone.
        let updates = random_updates(5, 16, 9);
        let mut net = Net::new(config(4, 3, 3), updates, &[], 9);
        net.run_until(Stage::MaskedInput);
        let part = net.parts[0].as_mut().expect("participant");
        let err = part.handle_shares(&[]).expect_err("no shares");
        assert!(
            err.to_string().contains("shares from 0 of 4 neighbours"),
            "{err}"
        );
    }

    #[test]
    fn forged_keys_and_tampered_shares_are_refused() {
        let updates = random_updates(5, 16, 5);
        let mut net = Net::new(config(4, 3, 3), updates.clone(), &[], 5);
        net.run_until(Stage::ShareKeys);
        let Some(CoordinatorOutput::Send {
            to,
            message: ToParticipant::Keys(mut keys),
        }) = net.coord.poll_output()
        else {
            panic!("keys first")
        };
        // The coordinator swaps in a mask key of its own.
        keys[0].1.mask_key = X25519Secret::from_bytes([7; 32]).public();
        let mut rng = rng_from_seed([1; 32]);
        let part = net.parts[usize::from(to)].as_mut().expect("participant");
        let err = part.handle_keys(&keys, &mut rng).expect_err("forged keys");
        assert!(err.to_string().contains("not signed"), "{err}");

        // Tampered shares do not open.
        let mut net = Net::new(config(4, 3, 3), updates, &[], 5);
        net.run_until(Stage::MaskedInput);
        loop {
            match net.coord.poll_output() {
                Some(CoordinatorOutput::Send {
                    to,
                    message: ToParticipant::Shares(mut shares),
                }) => {
                    shares[0].ciphertext[3] ^= 1;
                    let part = net.parts[usize::from(to)].as_mut().expect("participant");
                    let err = part.handle_shares(&shares).expect_err("tampered");
                    assert!(err.to_string().contains("does not open"), "{err}");
                    break;
                }
                Some(_) => continue,
                None => panic!("no shares were routed"),
            }
        }

        // The coordinator refuses an advert it cannot verify and a second
        // one from the same participant.
        let ids = identities(5);
        let session = net.coord.session().clone();
        let mut coord = SecAggCoordinator::new(session.clone(), 0);
        let (_, advert) = SecAggParticipant::new(session, &ids[1], &mut rng).expect("advert");
        assert!(coord.handle_message(2, advert.clone(), 0).is_err());
        coord
            .handle_message(1, advert.clone(), 0)
            .expect("accepted");
        assert!(coord.handle_message(1, advert, 0).is_err());
        // A low-order key, properly signed, is refused before it is
        // forwarded (it would fail every neighbour's agreement).
        let zero = X25519Public::from_bytes([0; 32]);
        let seed_commitment = [1; 32];
        let signature = ids[3].sign(
            KEYS_CONTEXT,
            &coord
                .session()
                .keys_message(3, &zero, &zero, &seed_commitment),
        );
        let low = FromParticipant::Advertise(KeyAdvert {
            cipher_key: zero,
            mask_key: zero,
            seed_commitment,
            signature,
        });
        let err = coord.handle_message(3, low, 0).expect_err("low order");
        assert!(err.to_string().contains("low-order"), "{err}");
        assert!(
            coord
                .handle_message(9, FromParticipant::Masked(MaskedInput(vec![0; 16])), 0)
                .is_err()
        );
    }

    fn sample_std(values: &[f32]) -> f64 {
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        (values
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt()
    }

    #[test]
    fn distributed_noise_adds_up_to_the_central_noise() {
        let mut config = config(4, 3, 5);
        config.noise = Some(DistributedNoise {
            clip_norm: 1.0,
            noise_multiplier: 1.0,
        });
        let dim = 20_000;
        let updates = vec![vec![0.0f32; dim]; 10];
        // Ten survivors, each adding z · C / √(5 − 1): the sum carries
        // √10 / 2 · z · C, and what protects one survivor from the others
        // (who know their own noise) is the other nine's, 3/2 · z · C.
        let result = finished(Net::new(config, updates.clone(), &[], 2).run());
        let std = sample_std(&result.sum);
        assert!((std - 10f64.sqrt() / 2.0).abs() < 0.03, "std {std}");
        let charged = result.charged_noise_multiplier.expect("charged");
        assert!(charged < 1.5 && charged > 0.99 * 1.5, "{charged}");

        // Five survivors, the fewest the round closes with: any four of
        // them carry z · C exactly.
        let updates = vec![vec![0.0f32; dim]; 6];
        let drops = [(3, Stage::MaskedInput)];
        let result = finished(Net::new(config, updates, &drops, 2).run());
        assert_eq!(result.survivors.len(), 5);
        let std = sample_std(&result.sum);
        assert!((std - 5f64.sqrt() / 2.0).abs() < 0.03, "std {std}");
        let charged = result.charged_noise_multiplier.expect("charged");
        assert!(charged < 1.0 && charged > 0.99, "{charged}");
        assert_eq!(
            config
                .minimum_charged_noise_multiplier(dim)
                .map(|z| (z * 1e6).round()),
            Some((charged * 1e6).round())
        );

        // No single masked input carries less than its own noise: one
        // participant's quantised update alone has std z · C / √(m − 1).
        let quantised =
            quantise(&config, &vec![0.0; dim], &mut rng_from_seed([3; 32])).expect("quantises");
        let alone = sample_std(&dequantise(&config, &quantised));
        assert!((alone - 0.5).abs() < 0.01, "{alone}");
    }

    #[test]
    fn distributed_dp_clips_each_update_to_its_norm() {
        let mut config = config(4, 3, 5);
        config.noise = Some(DistributedNoise {
            clip_norm: 1.0,
            noise_multiplier: 1e-6,
        });
        let big = vec![3.0f32; 100];
        let quantised = quantise(&config, &big, &mut rng_from_seed([3; 32])).expect("quantises");
        let back = dequantise(&config, &quantised);
        let norm = dp::l2_norm(&back);
        assert!((norm - 1.0).abs() < 1e-3, "{norm}");
    }

    #[test]
    fn sessions_refuse_settings_that_cannot_work() {
        let keys: Vec<PublicKey> = identities(10).iter().map(Identity::public).collect();
        let cases = [
            (config(3, 2, 5), "neighbours"),
            (config(4, 2, 5), "threshold"),
            (config(4, 5, 5), "threshold"),
            (config(4, 3, 11), "min_survivors"),
            (
                SecAggConfig {
                    clip_range: f32::NAN,
                    ..config(4, 3, 5)
                },
                "clip_range",
            ),
        ];
        for (config, what) in cases {
            let err = Session::new(config, [0; 32], keys.clone(), 10).expect_err(what);
            assert!(err.to_string().contains(what), "{what}: {err}");
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        }
        let mut twice = keys.clone();
        twice[1] = twice[0];
        assert!(Session::new(config(4, 3, 5), [0; 32], twice, 10).is_err());
        assert!(Session::new(config(4, 3, 5), [0; 32], keys.clone(), 0).is_err());
        // The stated bound: 2,048 participants fit 20 bits, 2,049 would not.
        let fits = SecAggConfig {
            quant_bits: 20,
            ..config(4, 3, 5)
        };
        fits.validate(2048).expect("2,048 participants fit");
        let err = fits.validate(2049).expect_err("2,049 do not");
        assert!(err.to_string().contains("overflow"), "{err}");
        let wide = SecAggConfig {
            quant_bits: 24,
            ..config(4, 3, 5)
        };
        let err = wide.validate(200).expect_err("24 bits for 200");
        assert!(err.to_string().contains("overflow"), "{err}");
    }

    #[test]
    fn messages_survive_the_wire_and_stay_small() {
        let updates = random_updates(5, 16, 6);
        let mut net = Net::new(config(4, 3, 3), updates, &[], 6);
        net.run_until(Stage::MaskedInput);
        while let Some(output) = net.coord.poll_output() {
            if let CoordinatorOutput::Send { message, .. } = output {
                let bytes = postcard::to_allocvec(&message).expect("encodes");
                let back: ToParticipant = postcard::from_bytes(&bytes).expect("decodes");
                assert_eq!(back, message);
                if let ToParticipant::Shares(shares) = &message {
                    // Four neighbours' share pairs, about 90 bytes each.
                    assert!(
                        bytes.len() < 4 * (ENCRYPTED_SHARE_LEN + 8),
                        "{}",
                        bytes.len()
                    );
                    assert_eq!(shares.len(), 4);
                }
            }
        }
    }
}
