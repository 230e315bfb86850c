//! The harness's top-level error, which every module's error converts into.

use crate::guest::GuestError;
use crate::images::ImagesError;
use crate::mode::ModeError;
use crate::process::ProcessError;
use crate::testhost::TestHostError;
use crate::vmm_bin::VmmBinError;

/// Any failure of the harness. Trials can `?` it into a [`libtest_mimic::Failed`].
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// Choosing between direct and nested mode failed.
    #[error(transparent)]
    Mode(#[from] ModeError),
    /// Building or locating the images failed.
    #[error(transparent)]
    Images(#[from] ImagesError),
    /// Building or locating the `mempower` binary failed.
    #[error(transparent)]
    VmmBin(#[from] VmmBinError),
    /// Running the nested test host failed.
    #[error(transparent)]
    TestHost(#[from] TestHostError),
    /// Booting or driving a guest failed.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// Waiting for a child process failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// The harness's result type.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;
