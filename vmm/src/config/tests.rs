use super::*;

fn node(s: &str) -> Result<NodeSpec, ConfigError> {
    s.parse()
}

#[test]
fn sizes_parse_with_binary_units() {
    assert_eq!(parse_size("256M").unwrap(), 256 << 20);
    assert_eq!(parse_size("1G").unwrap(), 1 << 30);
    assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
    assert_eq!(parse_size("2048K").unwrap(), 2 << 20);
    assert_eq!(parse_size("4096").unwrap(), 4096);
    assert_eq!(parse_size("1T").unwrap(), 1 << 40);
}

#[test]
fn bad_sizes_are_refused() {
    assert!(matches!(parse_size("12X"), Err(ConfigError::UnknownUnit { unit, .. }) if unit == "X"));
    assert!(matches!(parse_size("M"), Err(ConfigError::BadSize(_))));
    assert!(matches!(parse_size(""), Err(ConfigError::BadSize(_))));
    assert!(matches!(parse_size("-1M"), Err(ConfigError::BadSize(_))));
    assert!(matches!(
        parse_size("99999999999999999999"),
        Err(ConfigError::SizeOverflow(_))
    ));
    assert!(matches!(
        parse_size("99999999T"),
        Err(ConfigError::SizeOverflow(_))
    ));
    assert!(matches!(
        parse_memory_size("3M"),
        Err(ConfigError::Unaligned(_))
    ));
    assert!(matches!(
        parse_memory_size("0"),
        Err(ConfigError::Unaligned(_))
    ));
    assert_eq!(parse_memory_size("6M").unwrap(), 6 << 20);
}

#[test]
fn cpu_lists() {
    assert_eq!(parse_cpu_list("3").unwrap(), vec![3]);
    assert_eq!(parse_cpu_list("0-3").unwrap(), vec![0, 1, 2, 3]);
    assert_eq!(parse_cpu_list("[0-1,4,6-7]").unwrap(), vec![0, 1, 4, 6, 7]);
    for bad in ["", "a", "3-1", "[0-1", "0-", "1,,2", "[]", "254", "0-1000"] {
        assert!(parse_cpu_list(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn numa_specs() {
    let n = node("node=1,cpus=[2-3,5],memory=256M").unwrap();
    assert_eq!(
        n,
        NodeSpec {
            id: 1,
            cpus: vec![2, 3, 5],
            memory: 256 << 20,
            ..Default::default()
        }
    );
    let n = node("node=0,cpus=0,memory=256M,hotplug=1G,requested=512M").unwrap();
    assert_eq!((n.hotplug, n.requested), (1 << 30, 512 << 20));
    assert_eq!(node("memory=128M,node=0").unwrap().cpus, Vec::<u32>::new());
    for (bad, reason) in [
        ("node=0", "missing memory=SIZE"),
        ("cpus=0,memory=1G", "missing node=N"),
        ("node=x,memory=1G", "node id 'x' is not a number"),
        ("node=0,memory=1G,color=red", "unknown key 'color'"),
        ("node=0,memory=3M", "3M is not a multiple of 2 MiB"),
        ("node=0,memory=1Q", "unknown unit 'Q'"),
        ("node=0,node=1,memory=1G", "'node' is given twice"),
        ("node=0,memory", "'memory' is not key=value"),
        ("node=0,cpus=2-1,memory=1G", "invalid CPU list '2-1'"),
        (
            "node=0,memory=1G,hotplug=100M",
            "100M is not a multiple of 128 MiB",
        ),
        (
            "node=0,memory=1G,hotplug=1G,requested=3M",
            "3M is not a multiple of 2 MiB",
        ),
        (
            "node=0,memory=1G,hotplug=256M,requested=512M",
            "requested size 512M is above the hotplug size 256M",
        ),
        (
            "node=0,memory=1G,requested=2M",
            "requested size 2M is above the hotplug size 0",
        ),
        (
            "node=0,memory=1G,hotplug=1025G",
            "hotplug size 1025G is above the limit of 1 TiB per node",
        ),
        (
            "node=0,memory=1G,hotplug=2G,region=384M",
            "region size '384M' must be one of 128M, 256M, 512M, 1G, 2G",
        ),
        (
            "node=0,memory=1G,hotplug=8G,region=4G",
            "region size '4G' must be one of",
        ),
        (
            "node=0,memory=1G,hotplug=1536M,region=1G",
            "hotplug size 1536M is not a multiple of the region size 1G",
        ),
        (
            "node=0,memory=1G,region=1G,region=1G",
            "'region' is given twice",
        ),
    ] {
        let err = node(bad).unwrap_err();
        assert!(
            err.to_string().contains(reason),
            "{bad}: '{err}' does not say '{reason}'"
        );
    }
}

#[test]
fn host_node_and_huge_pages() {
    let n = node("node=0,cpus=0,memory=1G,host-node=1,hugepages=on").unwrap();
    assert_eq!((n.host_node, n.hugepages), (Some(1), true));
    let n = node("node=0,memory=1G,hugepages=off").unwrap();
    assert_eq!((n.host_node, n.hugepages), (None, false));
    let nodes = validate_nodes(vec![node("node=0,cpus=0,memory=1G,host-node=3").unwrap()]);
    assert_eq!(nodes.unwrap()[0].host_node, Some(3));
    for (bad, reason) in [
        (
            "node=0,memory=1G,host-node=x",
            "host node 'x' is not a number",
        ),
        (
            "node=0,memory=1G,host-node=-1",
            "host node '-1' is not a number",
        ),
        (
            "node=0,memory=1G,hugepages=yes",
            "hugepages='yes': expected on or off",
        ),
        (
            "node=0,memory=1G,hugepages=on,hugepages=on",
            "'hugepages' is given twice",
        ),
        (
            "node=0,memory=1G,host-node=0,host-node=0",
            "'host-node' is given twice",
        ),
    ] {
        let err = node(bad).unwrap_err();
        assert!(err.to_string().contains(reason), "{bad}: '{err}'");
    }
}

#[test]
fn regions_of_several_blocks_up_to_1_tib() {
    let n = node("node=0,cpus=0,memory=1G,hotplug=1T,region=2G").unwrap();
    assert_eq!((n.hotplug, n.region_size), (1 << 40, 2 << 30));
    assert_eq!(
        node("node=0,memory=1G,hotplug=1G").unwrap().region_size,
        128 << 20
    );
    for (text, size) in [("256M", 256 << 20), ("512M", 512 << 20), ("1G", 1 << 30)] {
        assert_eq!(parse_region_size(text).unwrap(), size);
    }
    for bad in ["64M", "128", "3G", "0", "x"] {
        assert!(parse_region_size(bad).is_err(), "{bad}");
    }
    let nodes = validate_nodes(vec![n]).unwrap();
    assert_eq!(nodes[0].region_size, 2 << 30);
}

#[test]
fn memslots_fit_or_the_error_says_which_regions_would() {
    let tib_node = |id, region_size| NodeConfig {
        id,
        hotplug: 1 << 40,
        region_size,
        ..Default::default()
    };
    let four: Vec<NodeConfig> = (0..4).map(|id| tib_node(id, 128 << 20)).collect();
    // 4 x 8192 regions and 4 boot slots: 32772 > 32764.
    let err = check_memslots(&four, 4, 32764).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the hotplug regions need 32772 KVM memory slots (one per region, plus 4 for \
         boot memory) but this host's KVM has 32764: use coarser regions, e.g. \
         region=256M in --numa"
    );
    assert!(check_memslots(&four[..3], 4, 32764).is_ok());
    let coarse: Vec<NodeConfig> = (0..4).map(|id| tib_node(id, 256 << 20)).collect();
    assert!(check_memslots(&coarse, 4, 32764).is_ok());
    // An old host with 509 slots: 512 GiB needs 2 GiB regions.
    let half = NodeConfig {
        hotplug: 1 << 39,
        ..tib_node(0, 128 << 20)
    };
    let err = check_memslots(&[half], 1, 509).unwrap_err();
    assert!(
        err.to_string().ends_with("e.g. region=2G in --numa"),
        "{err}"
    );
}

#[test]
fn node_sets_are_validated() {
    let spec = |id, cpus: &str, mem: u64| NodeSpec {
        id,
        cpus: parse_cpu_list(cpus).unwrap(),
        memory: mem << 20,
        ..Default::default()
    };
    let ok = validate_nodes(vec![spec(1, "2-3", 256), spec(0, "0-1", 256)]).unwrap();
    assert_eq!(ok.iter().map(|n| n.id).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(
        validate_nodes(vec![spec(0, "0-1", 256), spec(1, "1-2", 256)]).unwrap_err(),
        ConfigError::OverlappingCpus {
            cpu: 1,
            first: 0,
            second: 1
        }
    );
    assert_eq!(
        validate_nodes(vec![spec(0, "0", 256), spec(0, "1", 256)]).unwrap_err(),
        ConfigError::DuplicateNode(0)
    );
    assert_eq!(
        validate_nodes(vec![spec(0, "0", 256), spec(2, "1", 256)]).unwrap_err(),
        ConfigError::NodeGap {
            count: 2,
            missing: 1
        }
    );
    assert_eq!(
        validate_nodes(vec![spec(0, "0", 256), spec(1, "2", 256)]).unwrap_err(),
        ConfigError::CpuGap {
            count: 2,
            missing: 1
        }
    );
    assert_eq!(
        validate_nodes(vec![NodeSpec {
            id: 0,
            cpus: vec![],
            memory: 256 << 20,
            ..Default::default()
        }])
        .unwrap_err(),
        ConfigError::NoCpus
    );
    assert_eq!(
        validate_nodes(vec![spec(0, "0", 32)]).unwrap_err(),
        ConfigError::TooLittleMemory(32)
    );
    // A memory-only node is a valid NUMA topology.
    let memory_only = NodeSpec {
        id: 1,
        memory: 64 << 20,
        ..Default::default()
    };
    assert!(validate_nodes(vec![spec(0, "0", 256), memory_only]).is_ok());
}

#[test]
fn default_is_one_node_one_cpu() {
    let nodes = validate_nodes(vec![]).unwrap();
    assert_eq!(
        nodes,
        vec![NodeConfig {
            id: 0,
            cpus: vec![0],
            memory: 256 << 20,
            ..Default::default()
        }]
    );
}

#[test]
fn disk_specs() {
    let d = parse_disk("path=/img/root.ext4").unwrap();
    assert_eq!(d, DiskConfig::new("/img/root.ext4"));
    let d = parse_disk("id=root,readonly=on,path=a.img").unwrap();
    assert_eq!(
        (d.path.to_str(), d.readonly, d.id.as_deref()),
        (Some("a.img"), true, Some("root"))
    );
    assert!(!parse_disk("path=a,readonly=off").unwrap().readonly);
    for (bad, reason) in [
        ("", "'' is not key=value"),
        ("readonly=on", "missing path=IMG"),
        ("path=", "path is empty"),
        ("path=a,path=b", "'path' is given twice"),
        ("path=a,readonly=maybe", "readonly 'maybe' is not on or off"),
        ("path=a,size=1G", "unknown key 'size'"),
        ("path=a,id=", "disk id is empty"),
        (
            "path=a,id=way-too-long-for-a-serial",
            "longer than 20 bytes",
        ),
        ("path=a,id=has space", "printable ASCII"),
    ] {
        let err = parse_disk(bad).unwrap_err();
        assert!(
            err.to_string().contains(reason),
            "{bad}: '{err}' does not say '{reason}'"
        );
    }
}

#[test]
fn balloon_specs() {
    let b: BalloonSpec = "size=0,free_page_reporting=on,stats=5s,deflate_on_oom=on"
        .parse()
        .unwrap();
    assert_eq!(
        b,
        BalloonSpec {
            size: 0,
            free_page_reporting: true,
            stats: Some(Duration::from_secs(5)),
            deflate_on_oom: true,
        }
    );
    assert_eq!("".parse::<BalloonSpec>().unwrap(), BalloonSpec::default());
    let b: BalloonSpec = "size=64M,stats=250ms".parse().unwrap();
    assert_eq!(
        (b.size, b.stats, b.free_page_reporting),
        (64 << 20, Some(Duration::from_millis(250)), false)
    );
    assert_eq!(
        "stats=2m".parse::<BalloonSpec>().unwrap().stats,
        Some(Duration::from_secs(120))
    );
    assert_eq!("stats=off".parse::<BalloonSpec>().unwrap().stats, None);
    for (bad, reason) in [
        ("size=5000", "not a multiple of 4 KiB"),
        ("size=1Q", "unknown unit 'Q'"),
        ("free_page_reporting=yes", "expected on or off"),
        ("deflate_on_oom=", "expected on or off"),
        ("stats=5", "the unit is missing"),
        ("stats=5h", "unknown unit"),
        ("stats=0s", "must be more than 0"),
        ("stats=1441m", "longer than a day"),
        ("stats=s", "not a duration"),
        ("stats=99999999999999999999s", "not a duration"),
        ("size=0,size=4K", "'size' is given twice"),
        ("color=red", "unknown key 'color'"),
        ("size", "'size' is not key=value"),
    ] {
        let err = bad.parse::<BalloonSpec>().unwrap_err();
        assert!(
            err.to_string().contains(reason),
            "{bad}: '{err}' does not say '{reason}'"
        );
    }
}

#[test]
fn disks_are_checked_together() {
    let dir = std::env::temp_dir().join(format!("mempower-disks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    std::fs::write(&a, [0u8; 1024]).unwrap();
    std::fs::write(&b, [0u8; 1024]).unwrap();
    let disk = |p: &std::path::Path, id: Option<&str>| DiskConfig {
        id: id.map(String::from),
        ..DiskConfig::new(p)
    };
    validate_disks(&[disk(&a, Some("x")), disk(&b, None)], 3).unwrap();
    // The same image under another name is still the same image.
    let again = dir.join(".").join("a.img");
    assert_eq!(
        validate_disks(&[disk(&a, None), disk(&again, None)], 1).unwrap_err(),
        ConfigError::DuplicateDisk(again.clone())
    );
    assert_eq!(
        validate_disks(&[disk(&a, Some("x")), disk(&b, Some("x"))], 1).unwrap_err(),
        ConfigError::DuplicateDiskId("x".into())
    );
    let err = validate_disks(&[disk(&dir.join("none.img"), None)], 1).unwrap_err();
    assert!(err.to_string().starts_with("disk '"), "{err}");
    let err = validate_disks(&[disk(&dir, None)], 1).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    let many = vec![disk(&a, None); 18];
    let err = validate_disks(&many, 2).unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::TooManyDevices {
                needed: 20,
                max: 19,
                ..
            }
        ),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_balloon_fits_the_guest() {
    let nodes = [
        NodeConfig {
            memory: 256 << 20,
            hotplug: 1 << 30,
            requested: 128 << 20,
            ..Default::default()
        },
        NodeConfig {
            id: 1,
            memory: 256 << 20,
            ..Default::default()
        },
    ];
    let spec = |size| BalloonSpec {
        size,
        ..Default::default()
    };
    assert!(check_balloon(&spec(640 << 20), &nodes).is_ok());
    assert_eq!(
        check_balloon(&spec((640 << 20) + 4096), &nodes).unwrap_err(),
        ConfigError::BalloonTooLarge {
            size: "640 MiB".into(),
            ram_mib: 640
        }
    );
}

#[test]
fn files_are_checked() {
    let err = check_file("kernel", std::path::Path::new("/nonexistent/vmlinux")).unwrap_err();
    assert!(err
        .to_string()
        .starts_with("kernel '/nonexistent/vmlinux': "));
    assert!(check_file("kernel", std::path::Path::new("/")).is_err());
    assert!(check_file("kernel", std::path::Path::new("/proc/self/exe")).is_ok());
}
