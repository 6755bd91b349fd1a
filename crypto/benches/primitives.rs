//! `cargo bench -p openagi-crypto`: the table of `openagi bench crypto`,
//! built from this crate alone so a performance build takes minutes, not
//! the whole node's build time. Arguments: `[SECONDS_PER_RUN [RUNS]]`.

use std::time::Duration;

use openagi_crypto::bench::{CryptoBench, Reference, render, run};

fn main() {
    // `cargo bench` passes `--bench`; only plain numbers are ours.
    let numbers: Vec<f64> = std::env::args()
        .skip(1)
        .filter_map(|arg| arg.parse().ok())
        .collect();
    let options = CryptoBench {
        time: Duration::from_secs_f64(numbers.first().copied().unwrap_or(1.0).max(0.001)),
        runs: numbers.get(1).map_or(3, |&runs| runs.max(1.0) as usize),
    };
    let reference = Reference::default();
    match run(&options, &reference) {
        Ok(rows) => print!("{}", render(&rows, &options, &reference)),
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(1);
        }
    }
}
