//! `mempower run`'s usage errors, through the binary: one line on stderr, exit status 2.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mempower"))
        .args(args)
        .output()
        .expect("the mempower binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_seccomp_mode_is_a_one_line_usage_error() {
    let kernel = env!("CARGO_BIN_EXE_mempower");
    let (code, stderr) = run(&["run", "--kernel", kernel, "--seccomp", "strict"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("mempower: error: ") && stderr.contains("'strict'"),
        "{stderr}"
    );
    assert!(stderr.contains("kill, log, off"), "{stderr}");
}
