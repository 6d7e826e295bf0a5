//! The `tie` binary: parses the command line and runs it ([`cli::run`]).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            let message = tie_client::each_cause_once(e.as_ref());
            eprintln!("{}", tie::logging::fatal_line(&message));
            ExitCode::FAILURE
        }
    }
}
