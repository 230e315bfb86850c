use super::*;

fn tree(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mempower-hostnuma-{name}-{}", std::process::id()))
}

#[test]
fn lists_parse_and_format_as_the_kernel_writes_them() {
    assert_eq!(
        parse_list("0-3,8,10-11\n"),
        Some(vec![0, 1, 2, 3, 8, 10, 11])
    );
    assert_eq!(parse_list("5"), Some(vec![5]));
    assert_eq!(parse_list("\n"), Some(vec![]));
    for bad in ["x", "3-1", "1,,2", "-1", "0-99999999"] {
        assert_eq!(parse_list(bad), None, "{bad}");
    }
    assert_eq!(format_list(&[0u32, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
    assert_eq!(format_list(&[7u32]), "7");
    assert_eq!(format_list::<u32>(&[]), "none");
}

#[test]
fn nodes_without_memory_or_offline_do_not_exist_for_binding() {
    let root = tree("nodes");
    fake_tree(&root, "0,2", &[(0, "0-1"), (1, "2-3"), (2, "")]);
    // Online 0-3, memory on 0 and 2 only.
    let topo = HostTopology::at(&root);
    assert_eq!(topo.memory_nodes().unwrap(), vec![0, 2]);
    topo.check_node(2).unwrap();
    let err = topo.check_node(1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "host node 1 does not exist or has no memory (this host's nodes with memory: 0,2)"
    );
    assert!(topo.check_node(7).is_err());
    // A memory-only node: its guest node's threads stay unpinned.
    assert_eq!(topo.cpus_of(2).unwrap(), Vec::<usize>::new());
    assert_eq!(topo.thread_cpus(2).unwrap(), None);

    let nodes = [
        NodeConfig {
            id: 0,
            host_node: Some(2),
            ..Default::default()
        },
        NodeConfig {
            id: 1,
            host_node: Some(3),
            ..Default::default()
        },
    ];
    let err = topo.check_config(&nodes).unwrap_err();
    assert_eq!(
        err.to_string(),
        "--numa node=1: host-node=3: host node 3 does not exist or has no memory (this \
         host's nodes with memory: 0,2)"
    );
    topo.check_config(&nodes[..1]).unwrap();
    // A tree that cannot be read is an error that names the file.
    let err = HostTopology::at(root.join("nowhere"))
        .check_node(0)
        .unwrap_err();
    assert!(err.to_string().contains("nowhere/online"), "{err}");
    std::fs::write(root.join("has_memory"), "zero\n").unwrap();
    assert!(matches!(
        topo.memory_nodes(),
        Err(HostNumaError::BadList { .. })
    ));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn thread_cpus_are_the_nodes_cpus_this_process_may_use() {
    let allowed = current_affinity().unwrap();
    let last = *allowed.last().unwrap();
    let root = tree("cpus");
    let list = format!("{last},{}", libc::CPU_SETSIZE - 1);
    fake_tree(&root, "0-1", &[(0, &list), (1, "1000")]);
    let topo = HostTopology::at(&root);
    assert_eq!(topo.thread_cpus(0).unwrap(), Some(vec![last]));
    let err = topo.thread_cpus(1).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("host node 1's CPUs (1000) are all outside the CPUs this process"),
        "{err}"
    );
    let nodes = [
        NodeConfig::default(),
        NodeConfig {
            id: 1,
            host_node: Some(0),
            ..Default::default()
        },
    ];
    assert_eq!(
        topo.placement(&nodes).unwrap(),
        vec![None, Some(vec![last])]
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_spawned_thread_runs_on_its_cpus_before_its_work() {
    let allowed = current_affinity().unwrap();
    let last = *allowed.last().unwrap();
    let handle = spawn_on(
        Builder::new().name("pinned".into()),
        "pinned",
        Some(vec![last]),
        move || {
            // SAFETY: gettid has no arguments and cannot fail.
            let tid = unsafe { libc::gettid() };
            let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
            let listed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|l| l.trim().to_string());
            (current_affinity().unwrap(), listed)
        },
    )
    .unwrap();
    let (affinity, listed) = handle.join().unwrap();
    assert_eq!(affinity, vec![last]);
    assert_eq!(listed, Some(last.to_string()));
    // The caller's own affinity is unchanged.
    assert_eq!(current_affinity().unwrap(), allowed);

    // CPUs the host does not have: the error comes back and the work never runs.
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ran.clone();
    let err = spawn_on(Builder::new(), "nowhere", Some(vec![1000]), move || {
        flag.store(true, std::sync::atomic::Ordering::SeqCst)
    })
    .unwrap_err();
    assert!(err.to_string().starts_with("thread '"), "{err}");
    assert!(err.to_string().contains("CPUs 1000"), "{err}");
    assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
    assert!(matches!(
        spawn_on(
            Builder::new(),
            "big",
            Some(vec![libc::CPU_SETSIZE as usize]),
            || ()
        ),
        Err(HostNumaError::CpuTooLarge(_))
    ));
    // Without CPUs the thread runs where it was.
    let free = spawn_on(Builder::new(), "free", None, || current_affinity().unwrap()).unwrap();
    assert_eq!(free.join().unwrap(), allowed);
}

#[test]
fn bound_memory_shows_its_policy_in_numa_maps() {
    let node = HostTopology::system().memory_nodes().unwrap()[0];
    let len = 4 << 20;
    // SAFETY: a fresh private anonymous mapping; checked below, unmapped at the end.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    let line = numa_maps_line(addr as u64).unwrap();
    assert!(line.contains(" default"), "{line}");
    bind_memory(addr as usize, len, node).unwrap();
    let line = numa_maps_line(addr as u64).unwrap();
    assert!(line.contains(&format!(" bind:{node}")), "{line}");
    // Binding to a node the host does not have fails and says where.
    let err = bind_memory(addr as usize, len, 1000).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "cannot bind 0x400000 bytes at {:#x} to host node 1000",
            addr as u64
        )),
        "{err}"
    );
    // SAFETY: unmaps exactly the mapping made above, which nothing uses any more.
    unsafe { libc::munmap(addr, len) };
}
