use super::*;
use crate::memory::tests::two_node_fixture;
use crate::numa::tests::Fixture;
use crate::usage::KPF_BUDDY;

const PRESENT: u64 = 1 << 63;

/// The two-node fixture with 8-page blocks: block 8 (node 1, online) has pages 64..72,
/// of which 64, 65 and 66 are free; block 0 and 1 are node 0's, 9 node 1's.
fn fixture(name: &str) -> Fixture {
    let fx = two_node_fixture(name);
    fx.file("sys/devices/system/memory/block_size_bytes", "8000\n");
    let mut flags = Vec::new();
    for pfn in 0u64..11 * 8 {
        let free = matches!(pfn, 64..=66) || pfn < 8;
        let value: u64 = if free { 1 << KPF_BUDDY } else { 1 << 5 };
        flags.extend_from_slice(&value.to_le_bytes());
    }
    std::fs::create_dir_all(fx.0.join("proc")).unwrap();
    std::fs::write(fx.0.join("proc/kpageflags"), flags).unwrap();
    fx.file(
        "proc/zoneinfo",
        "Node 0, zone Movable\n  pages free 1000\n  high 10\nNode 1, zone Movable\n  \
         pages free 50\n  high 5\n  protection: (0, 0)\n",
    );
    process(&fx, 100, 5);
    fx
}

/// A process `pid` with start time `start` and one resident mapping of pages 16..32.
fn process(fx: &Fixture, pid: u32, start: u64) {
    let fields: Vec<String> = (3..=21).map(|i| i.to_string()).collect();
    fx.file(
        &format!("proc/{pid}/stat"),
        &format!("{pid} (fake (agent)) {} {start} 0 0\n", fields.join(" ")),
    );
    fx.file(
        &format!("proc/{pid}/smaps"),
        "00010000-00020000 rw-p 00000000 00:00 0\nRss: 16 kB\n",
    );
}

/// Writes `/proc/<pid>/pagemap` with `frames[(page, pfn)]` present, all else absent.
fn pagemap(fx: &Fixture, pid: u32, frames: &[(u64, u64)]) {
    let mut bytes = vec![0u8; 32 * 8];
    for (page, pfn) in frames {
        let at = *page as usize * 8;
        bytes[at..at + 8].copy_from_slice(&(PRESENT | pfn).to_le_bytes());
    }
    std::fs::write(fx.0.join(format!("proc/{pid}/pagemap")), bytes).unwrap();
}

#[test]
fn track_counts_usage_mapped_pages_and_room() {
    let fx = fixture("loc-track");
    // Pages 16, 17, 19, 20 are in block 8; 18 is in block 1 (not tracked).
    pagemap(&fx, 100, &[(16, 67), (17, 68), (18, 9), (19, 69), (20, 70)]);
    let tracks = Tracks::default();
    let t = tracks.track(&fx.0, &[8]).unwrap();
    assert_eq!(t.token, 1);
    assert!(!t.node_local_offline, "no patch parameter in the fixture");
    assert_eq!(
        t.blocks,
        [TrackedBlock {
            block: 8,
            node: Some(1),
            in_use_pages: 5,
            mapped_pages: 4,
        }]
    );
    // Node 1: 50 free - 5 high - 3 free pages of block 8 itself.
    assert_eq!(
        t.rooms,
        [
            NodeRoom {
                node: 0,
                free_pages: 990
            },
            NodeRoom {
                node: 1,
                free_pages: 42
            }
        ]
    );
    fx.file(NODE_LOCAL_PARAM, "Y\n");
    assert!(tracks.track(&fx.0, &[8]).unwrap().node_local_offline);
    // An offline block has nothing to migrate, and its free pages are no one's.
    let t = tracks.track(&fx.0, &[9]).unwrap();
    assert_eq!(t.blocks[0].in_use_pages, 0);
    assert_eq!(t.rooms[1].free_pages, 45);
    let err = tracks.track(&fx.0, &[8, 7]).unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT);
}

#[test]
fn settle_says_where_each_page_went() {
    let fx = fixture("loc-settle");
    pagemap(&fx, 100, &[(16, 67), (17, 68), (19, 69), (20, 70)]);
    let tracks = Tracks::default();
    let token = tracks.track(&fx.0, &[8]).unwrap().token;
    // 16 went to node 0 (block 1), 17 to node 1 (block 9), 19 stayed, 20 is unmapped.
    pagemap(&fx, 100, &[(16, 9), (17, 73), (19, 69)]);
    let settled = tracks.settle(&fx.0, token, false).unwrap();
    assert_eq!(
        settled,
        [SettledBlock {
            block: 8,
            node: Some(1),
            tracked_pages: 4,
            unmoved_pages: 1,
            on_node_pages: 1,
            moved_back_pages: 0,
            off_node_pages: 1,
            gone_pages: 1,
        }]
    );
    let err = tracks.settle(&fx.0, token, false).unwrap_err();
    assert_eq!(
        (err.errno(), err.to_string()),
        (libc::EINVAL, format!("no such track token: {token}"))
    );
}

#[test]
fn a_replaced_process_is_not_followed_and_move_back_needs_a_process() {
    let fx = fixture("loc-replaced");
    pagemap(&fx, 100, &[(16, 67), (17, 68)]);
    let tracks = Tracks::default();
    let first = tracks.track(&fx.0, &[8]).unwrap().token;
    let second = tracks.track(&fx.0, &[8]).unwrap().token;
    pagemap(&fx, 100, &[(16, 9), (17, 9)]);
    // move_back on a pid of the fixture: move_pages cannot reach it (no such process
    // here, or not this one), so both stay counted off the node.
    let settled = tracks.settle(&fx.0, first, true).unwrap();
    assert_eq!(
        (settled[0].off_node_pages, settled[0].moved_back_pages),
        (2, 0)
    );
    process(&fx, 100, 6); // the pid now belongs to another process
    let settled = tracks.settle(&fx.0, second, true).unwrap();
    assert_eq!((settled[0].tracked_pages, settled[0].gone_pages), (2, 2));
}

#[test]
fn tracks_are_bounded() {
    let fx = fixture("loc-bounded");
    pagemap(&fx, 100, &[]);
    let tracks = Tracks::default();
    let tokens: Vec<u64> = (0..MAX_TRACKS + 2)
        .map(|_| tracks.track(&fx.0, &[8]).unwrap().token)
        .collect();
    assert_eq!(tracks.lock().len(), MAX_TRACKS);
    for old in &tokens[..2] {
        assert!(
            tracks.settle(&fx.0, *old, false).is_err(),
            "oldest forgotten"
        );
    }
    assert!(tracks.settle(&fx.0, tokens[2], false).is_ok());
    assert!(tracks.forget(tokens[3]));
    assert!(!tracks.forget(tokens[3]));
    assert!(tracks.settle(&fx.0, tokens[3], false).is_err(), "forgotten");
}

#[test]
fn move_pages_moves_our_own_page() {
    let mut buf = vec![1u8; PAGE_SIZE as usize * 2];
    buf[PAGE_SIZE as usize] = 2;
    let page = (buf.as_ptr() as u64).div_ceil(PAGE_SIZE);
    let me = std::process::id();
    // Node 0 exists everywhere; node 4000 nowhere, which fails the whole call.
    assert_eq!(
        move_pages(me, &[(0, page, 0), (0, page + 1, 0)]),
        [true, true]
    );
    assert_eq!(move_pages(me, &[(0, page, 4000)]), [false]);
    assert_eq!(move_pages(u32::MAX >> 1, &[(0, page, 0)]), [false]);
    drop(buf);
}

#[test]
fn compact_node_needs_the_node() {
    let fx = two_node_fixture("loc-compact");
    compact_node(&fx.0, 1).unwrap();
    assert_eq!(
        std::fs::read_to_string(fx.0.join("sys/devices/system/node/node1/compact")).unwrap(),
        "1"
    );
    let err = compact_node(&fx.0, 7).unwrap_err();
    assert_eq!(
        (err.errno(), err.to_string()),
        (libc::ENOENT, "node 7 does not exist".to_string())
    );
}
