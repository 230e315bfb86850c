//! Direct or nested: where guests run.

use std::path::Path;
use std::sync::OnceLock;

/// The environment variable that forces a mode: `direct` or `nested`.
pub const MODE_ENV: &str = "MEMPOWER_TEST_MODE";

/// Where the tests' guests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The VMM uses this machine's `/dev/kvm`.
    Direct,
    /// Tests re-run inside a QEMU TCG test host, whose emulated SVM gives a real KVM.
    Nested,
}

impl Mode {
    /// `direct` or `nested`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Nested => "nested",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of mode detection.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModeError {
    /// `MEMPOWER_TEST_MODE` has a value other than `direct` or `nested`.
    #[error("{MODE_ENV}={0:?}: expected `direct` or `nested`")]
    BadOverride(String),
}

/// Parses a `MEMPOWER_TEST_MODE` value (case-insensitive, surrounding blanks ignored).
pub fn parse_override(value: &str) -> Result<Mode, ModeError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "direct" => Ok(Mode::Direct),
        "nested" => Ok(Mode::Nested),
        _ => Err(ModeError::BadOverride(value.to_string())),
    }
}

/// What detection looks at; split out so that it can be tested.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The value of `MEMPOWER_TEST_MODE`, if set and non-empty.
    pub override_value: Option<String>,
    /// `/sys/module/kvm_pvm` exists.
    pub kvm_pvm_loaded: bool,
    /// `/dev/kvm` opened read-write, or the error it gave.
    pub dev_kvm: Result<(), String>,
}

impl Probe {
    /// Looks at this machine.
    pub fn current() -> Probe {
        let override_value = std::env::var(MODE_ENV)
            .ok()
            .filter(|v| !v.trim().is_empty());
        let kvm_pvm_loaded = Path::new("/sys/module/kvm_pvm").exists();
        let dev_kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
            .map_err(|e| e.to_string());
        Probe {
            override_value,
            kvm_pvm_loaded,
            dev_kvm,
        }
    }

    /// Chooses the mode and says why.
    pub fn decide(&self) -> Result<(Mode, String), ModeError> {
        if let Some(value) = &self.override_value {
            let mode = parse_override(value)?;
            return Ok((mode, format!("{MODE_ENV}={value}")));
        }
        if self.kvm_pvm_loaded {
            return Ok((
                Mode::Nested,
                "/dev/kvm is kvm_pvm, which cannot run a stock guest's user space".to_string(),
            ));
        }
        match &self.dev_kvm {
            Ok(()) => Ok((Mode::Direct, "/dev/kvm is usable".to_string())),
            Err(e) => Ok((
                Mode::Nested,
                format!("/dev/kvm is not usable ({e}); QEMU TCG only"),
            )),
        }
    }
}

/// The mode of this process, detected once. The first call prints `mode: <mode> (<why>)`.
pub fn mode() -> Result<Mode, ModeError> {
    static MODE: OnceLock<Result<Mode, ModeError>> = OnceLock::new();
    MODE.get_or_init(|| {
        let decided = Probe::current().decide();
        if let Ok((mode, why)) = &decided {
            println!("mode: {mode} ({why})");
        }
        decided.map(|(mode, _)| mode)
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_values() {
        assert_eq!(parse_override("direct").unwrap(), Mode::Direct);
        assert_eq!(parse_override(" Nested\n").unwrap(), Mode::Nested);
        assert!(matches!(parse_override("tcg"), Err(ModeError::BadOverride(v)) if v == "tcg"));
        assert!(parse_override("").is_err());
    }

    #[test]
    fn override_wins() {
        let probe = Probe {
            override_value: Some("direct".into()),
            kvm_pvm_loaded: true,
            dev_kvm: Ok(()),
        };
        let (mode, why) = probe.decide().unwrap();
        assert_eq!(mode, Mode::Direct);
        assert!(why.contains("MEMPOWER_TEST_MODE=direct"), "{why}");
        let bad = Probe {
            override_value: Some("fast".into()),
            ..probe
        };
        assert!(bad.decide().is_err());
    }

    #[test]
    fn detection_order() {
        let pvm = Probe {
            override_value: None,
            kvm_pvm_loaded: true,
            dev_kvm: Ok(()),
        };
        assert_eq!(pvm.decide().unwrap().0, Mode::Nested);
        let kvm = Probe {
            kvm_pvm_loaded: false,
            ..pvm.clone()
        };
        assert_eq!(kvm.decide().unwrap().0, Mode::Direct);
        let none = Probe {
            dev_kvm: Err("No such file or directory".into()),
            ..kvm
        };
        let (mode, why) = none.decide().unwrap();
        assert_eq!(mode, Mode::Nested);
        assert!(why.contains("No such file"), "{why}");
    }
}
