//! The `tie` binary: parses the command line and runs it ([`cli::run`]).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", tie_client::each_cause_once(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
