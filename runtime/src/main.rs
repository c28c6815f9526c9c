//! The `cairn` command line.

use std::process::ExitCode;

fn main() -> ExitCode {
    match cairn::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
