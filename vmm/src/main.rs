//! `mempower`: boots a Linux guest on several virtual NUMA nodes (`mempower run`), and
//! talks to a running one through its API socket (the other subcommands).

fn main() -> std::process::ExitCode {
    vmm::cli::main()
}
