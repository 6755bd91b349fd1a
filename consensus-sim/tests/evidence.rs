//! Equivocation evidence: a replica that receives two conflicting votes
//! from one validator reports both, the proof verifies for anyone with the
//! validator set and names the offender, and doctored evidence does not
//! verify.

use openagi_consensus::evidence::{EVIDENCE_TAG, Equivocation};
use openagi_consensus::messages::Prepare;
use openagi_consensus::{
    Config, DropReason, IdentitySigner, Message, NetworkId, Output, Replica, StrictCrypto,
    ValidatorSet,
};
use openagi_crypto::{Identity, Signed};

fn identities() -> Vec<Identity> {
    (0..4u8)
        .map(|i| Identity::from_seed(&[i + 1; 32]))
        .collect()
}

fn prepare(signer: &Identity, vs: &ValidatorSet, seq: u64, digest: u8) -> Signed<Prepare> {
    Signed::sign(
        signer,
        &Prepare {
            network: vs.network(),
            view: 0,
            seq,
            digest: [digest; 32],
        },
    )
    .expect("sign")
}

#[test]
fn conflicting_prepares_become_verifiable_evidence() {
    let ids = identities();
    let vs = ValidatorSet::new(
        NetworkId::from_name("test"),
        ids.iter().map(|i| i.public()).collect(),
    )
    .expect("distinct");
    let mut replica = Replica::new(
        Config::default(),
        vs.clone(),
        IdentitySigner::new(Identity::from_seed(&[3; 32])),
        0,
    )
    .expect("member");
    let first = prepare(&ids[1], &vs, 1, 0xaa);
    let second = prepare(&ids[1], &vs, 1, 0xbb);
    replica.handle_message(Message::Prepare(first.clone()), 0);
    replica.handle_message(Message::Prepare(first.clone()), 0);
    replica.handle_message(Message::Prepare(second.clone()), 0);
    let evidence: Vec<Equivocation> = std::iter::from_fn(|| replica.poll_output())
        .filter_map(|o| match o {
            Output::Evidence(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(evidence.len(), 1, "a repeated vote is no evidence");
    assert_eq!(replica.stats().dropped(DropReason::Equivocation), 1);
    assert_eq!(replica.stats().dropped(DropReason::Duplicate), 1);
    let proven = evidence[0].verify(&vs, &StrictCrypto).expect("verifies");
    assert_eq!(proven.validator, ids[1].public());
    assert_eq!((proven.kind, proven.view, proven.seq), ("prepare", 0, 1));

    // Through the ledger and back.
    let payload = evidence[0].to_payload().expect("encodes");
    assert!(payload.starts_with(EVIDENCE_TAG));
    assert_eq!(
        Equivocation::from_payload(&payload).expect("decodes"),
        Some(evidence[0].clone())
    );
    assert_eq!(
        Equivocation::from_payload(b"a transfer").expect("not evidence"),
        None
    );

    // Doctored evidence does not verify.
    let other_signer = Equivocation::Prepares(first.clone(), prepare(&ids[2], &vs, 1, 0xbb));
    assert!(other_signer.verify(&vs, &StrictCrypto).is_err());
    let agreeing = Equivocation::Prepares(first.clone(), first.clone());
    assert!(agreeing.verify(&vs, &StrictCrypto).is_err());
    let other_seq = Equivocation::Prepares(first.clone(), prepare(&ids[1], &vs, 2, 0xbb));
    assert!(other_seq.verify(&vs, &StrictCrypto).is_err());
    let outsider = Identity::from_seed(&[9; 32]);
    let not_member = Equivocation::Prepares(
        prepare(&outsider, &vs, 1, 0xaa),
        prepare(&outsider, &vs, 1, 0xbb),
    );
    assert!(not_member.verify(&vs, &StrictCrypto).is_err());
}
