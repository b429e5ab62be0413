//! The `wsloop` command: a thin CLI over the library.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
