//! The text of `/proc/meminfo` and of a node's `meminfo`
//! (`/sys/devices/system/node/nodeN/meminfo`), which the agent reads in the guest and the
//! VMM on the host:
//!
//! ```text
//! MemTotal:       24683792 kB          Node 0 MemTotal:       24683792 kB
//! MemFree:        21058608 kB          Node 0 MemFree:        21058608 kB
//! ```

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeminfoError {
    #[error("no {0} line")]
    Missing(String),
    /// The line, cut to [`QUOTED`] characters: the text may be anyone's.
    #[error("malformed line {0:?}")]
    Malformed(String),
}

/// How much of a bad line an error quotes.
const QUOTED: usize = 120;

/// The figures of `keys` (with their colon, e.g. `"MemFree:"`), in bytes, in the order
/// asked. A line is `[Node <n>] <key> <digits> kB`; lines of other keys are skipped
/// whatever they hold, a line of a key asked that is not that form is an error, as is a
/// key with no line. The first of repeated lines counts. Figures past what bytes can
/// hold saturate.
pub fn parse<const N: usize>(text: &str, keys: [&str; N]) -> Result<[u64; N], MeminfoError> {
    let mut kib: [Option<u64>; N] = [None; N];
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let mut key = words.next();
        if key == Some("Node") {
            words.next();
            key = words.next();
        }
        let Some(slot) = key.and_then(|k| keys.iter().position(|&want| want == k)) else {
            continue;
        };
        if kib[slot].is_some() {
            continue;
        }
        let value = words
            .next()
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok());
        match (value, words.next(), words.next()) {
            (Some(value), Some("kB"), None) => kib[slot] = Some(value),
            _ => return Err(MeminfoError::Malformed(line.chars().take(QUOTED).collect())),
        }
    }
    let mut bytes = [0; N];
    for ((bytes, kib), key) in bytes.iter_mut().zip(kib).zip(keys) {
        *bytes = kib
            .ok_or_else(|| MeminfoError::Missing(key.to_owned()))?
            .saturating_mul(1024);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "Node 3 MemTotal:       1048576 kB\n\
                        Node 3 MemFree:        100 kB\n\
                        Node 3 Active(anon):     4 kB\n\
                        Node 3 Inactive(file):   2 kB\n\
                        Node 3 HugePages_Total:     0\n\
                        Node 3 Active(file):     1 kB\n";

    #[test]
    fn reads_a_nodes_and_procs_figures_in_the_order_asked() {
        assert_eq!(
            parse(NODE, ["Active(file):", "MemFree:", "Inactive(file):"]),
            Ok([1 << 10, 100 << 10, 2 << 10])
        );
        let proc = "MemTotal: 7 kB\nMemFree: 5 kB\nMemAvailable: 6 kB\nMemFree: 999 kB\n";
        assert_eq!(
            parse(proc, ["MemAvailable:", "MemFree:"]),
            Ok([6 << 10, 5 << 10]),
            "the first of repeated lines counts"
        );
        assert_eq!(
            parse("MemFree: 18446744073709551615 kB", ["MemFree:"]),
            Ok([u64::MAX])
        );
        assert_eq!(parse("", []), Ok([]));
    }

    #[test]
    fn malformed_text_is_an_error_never_a_panic() {
        for bad in [
            "Node 3 MemFree: -1 kB",
            "Node 3 MemFree: 1 MB",
            "Node 3 MemFree: 1",
            "Node 3 MemFree: 1 kB x",
            "Node 3 MemFree:",
            "Node 3 MemFree: 99999999999999999999999 kB",
            "Node 3 MemFree: ١ kB",
            "MemFree: +1 kB",
        ] {
            let text = NODE.replace("Node 3 MemFree:        100 kB", bad);
            assert_eq!(
                parse(&text, ["MemFree:"]),
                Err(MeminfoError::Malformed(bad.to_owned())),
                "{bad:?}"
            );
        }
        for missing in [
            "Node",
            "Node 3",
            "MemFree 1 kB",
            "Node 3 Node 3 MemFree: 1 kB",
        ] {
            let text = NODE.replace("Node 3 MemFree:        100 kB", missing);
            assert_eq!(
                parse(&text, ["MemFree:"]),
                Err(MeminfoError::Missing("MemFree:".into())),
                "{missing:?}"
            );
        }
        // Junk in lines not asked for is no error; a bad line is quoted in part.
        let junk = format!("{NODE}\u{0}\n\nNode 3 Dirty: x y z\nNode\n");
        assert!(parse(&junk, ["MemFree:"]).is_ok());
        let long = format!("MemFree: {}", "9".repeat(10_000));
        let Err(MeminfoError::Malformed(line)) = parse(&long, ["MemFree:"]) else {
            panic!("a figure past u64 is malformed");
        };
        assert_eq!(line.chars().count(), QUOTED);
    }
}
