use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "test.toml")
}

#[test]
fn the_embedded_example_states_the_defaults() {
    assert_eq!(parse(DEFAULT_CONFIG).unwrap(), Config::default());
    assert_eq!(parse("").unwrap(), Config::default());
}

/// The commented model examples in etc/gpuctld.toml must stay valid.
#[test]
fn the_commented_model_examples_parse() {
    let start = DEFAULT_CONFIG.find("# [models.remacri-x4]").unwrap();
    let examples: String = DEFAULT_CONFIG[start..]
        .lines()
        .map(|line| {
            line.strip_prefix("# ")
                .or(line.strip_prefix('#'))
                .unwrap_or(line)
        })
        .collect::<Vec<_>>()
        .join("\n");
    let config = parse(&examples).unwrap();
    let models = config.model_infos();
    assert_eq!(models.len(), 3);
    assert_eq!(models[0].name, "portrait");
    let sdxl = &config.models["sdxl"];
    assert_eq!(sdxl.command.as_ref().map(Vec::len), Some(2));
    assert_eq!(sdxl.load_timeout(), std::time::Duration::from_secs(600));
    assert_eq!(models[0].defaults.size, Some((896, 1152)));
    assert_eq!(
        models[0].keep_alive,
        KeepAlive::Millis(300_000),
        "inherits policy.keep_alive"
    );
    assert_eq!(
        models[1].path,
        "/var/lib/gpuctl/models/upscale/remacri-x4.pt"
    );
    assert_eq!(models[1].keep_alive, KeepAlive::Millis(30 * 60_000));
}

#[test]
fn a_command_model_needs_no_path_and_keeps_its_settings() {
    let config = parse(
        "model_root = \"/srv/models\"\n\
         [models.sd]\nkind = \"generate\"\ncommand = [\"python\", \"-m\", \"app.sd\"]\n\
         env = { HF_HUB_OFFLINE = \"1\" }\ncwd = \"apps/sd\"\nload_timeout = \"20m\"\n\
         options = { scheduler = \"euler\", loras = [{ path = \"a.safetensors\", strength = 0.8 }] }\n\
         [models.up]\npath = \"up.pt\"\nkind = \"image\"\n",
    )
    .unwrap();
    let sd = &config.models["sd"];
    assert_eq!(config.model_path(sd), None);
    assert_eq!(config.model_cwd(sd), PathBuf::from("/srv/models/apps/sd"));
    assert_eq!(sd.load_timeout(), std::time::Duration::from_secs(1200));
    assert_eq!(sd.env["HF_HUB_OFFLINE"], "1");
    assert_eq!(sd.options["scheduler"].as_str(), Some("euler"));
    assert_eq!(
        config.model_source(sd),
        "python -m app.sd",
        "shown as its command"
    );
    let up = &config.models["up"];
    assert_eq!(up.load_timeout(), model::DEFAULT_LOAD_TIMEOUT);
    assert_eq!(config.model_cwd(up), PathBuf::from("/srv/models"));
    assert_eq!(config.model_source(up), "/srv/models/up.pt");
}

#[test]
fn unknown_keys_name_file_and_key() {
    let error = parse("[daemon]\nsocket_mode = \"0600\"\nbogus = 1\n").unwrap_err();
    assert_eq!(error.key.as_deref(), Some("daemon.bogus"), "{error}");
    assert_eq!(error.location, Some((3, 1)));
    let text = error.to_string();
    assert!(
        text.starts_with("test.toml:3:1: key `daemon.bogus`: unknown field"),
        "{text}"
    );

    let error = parse("typo = 1\n").unwrap_err();
    assert_eq!(error.key.as_deref(), Some("typo"), "{error}");

    let error = parse("[models.a]\npath = \"a.pt\"\nkind = \"image\"\ntiles = 3\n").unwrap_err();
    assert_eq!(error.key.as_deref(), Some("models.a.tiles"), "{error}");
}

#[test]
fn bad_values_name_key_and_problem() {
    let cases = [
        (
            "[policy]\nkeep_alive = \"5x\"",
            "policy.keep_alive",
            "invalid duration",
        ),
        (
            "[daemon]\nsocket_mode = \"999\"",
            "daemon.socket_mode",
            "invalid mode",
        ),
        (
            "[daemon]\nmax_frame = \"1GiB\"",
            "daemon.max_frame",
            "between 2.0 MiB and 64.0 MiB",
        ),
        (
            "[daemon]\nmax_frame = \"1MiB\"",
            "daemon.max_frame",
            "frames of 1 MiB and a few bytes",
        ),
        (
            "[daemon]\nthreads = 0",
            "daemon.threads",
            "between 1 and 64",
        ),
        (
            "[daemon]\nthreads = 65",
            "daemon.threads",
            "between 1 and 64",
        ),
        (
            "[daemon]\nmax_connections = 0",
            "daemon.max_connections",
            "at least 1",
        ),
        (
            "[daemon]\nlog_level = \"loud\"",
            "daemon.log_level",
            "invalid log filter",
        ),
        (
            "[daemon]\nadmin_group = \"no-such-group-xyz\"",
            "daemon.admin_group",
            "no group named",
        ),
        (
            "[models.a]\nkind = \"image\"",
            "models.a.path",
            "is missing: name a TorchScript file, or set command",
        ),
        (
            "[models.a]\nkind = \"image\"\ncommand = []",
            "models.a.command",
            "must name a program first",
        ),
        (
            "[models.a]\nkind = \"image\"\ncommand = [\"\", \"x\"]",
            "models.a.command",
            "must name a program first",
        ),
        (
            "[models.a]\nkind = \"image\"\ncommand = \"python -m app\"",
            "models.a.command",
            "invalid type: string",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"image\"\nenv = { HF_HOME = \"/x\" }",
            "models.a.env",
            "applies only to models with a command",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"image\"\noptions = { steps = 4 }",
            "models.a.options",
            "applies only to models with a command",
        ),
        (
            "[models.a]\nkind = \"image\"\ncommand = [\"w\"]\nenv = { \"A=B\" = \"1\" }",
            "models.a.env",
            "\"A=B\" is not a valid environment variable",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"image\"\nloras = [{ path = \"\" }]",
            "models.a.loras",
            "a LoRA needs a path",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"image\"\nloras = [{ path = \"l.safetensors\", strength = nan }]",
            "models.a.loras",
            "the strength of l.safetensors must be a finite number",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"image\"\nloras = [{ path = \"l.safetensors\", weight = 1 }]",
            "models.a.loras[0].weight",
            "unknown field `weight`, expected `path` or `strength`",
        ),
        (
            "[models.a]\nkind = \"image\"\ncommand = [\"w\"]\nload_timeout = \"0s\"",
            "models.a.load_timeout",
            "longer than 0s",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"video\"",
            "models.a.kind",
            "unknown variant `video`",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"image\"\ndevice = \"gpu0\"",
            "models.a.device",
            "invalid device",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"image\"\ntile = 64\noverlap = 32",
            "models.a.overlap",
            "too large for tile 64",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"tensor\"\nscale = 2",
            "models.a.scale",
            "only to models of kind \"image\"",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"tensor\"\nprecision = \"fp16\"",
            "models.a.precision",
            "only to models of kind \"image\" and \"generate\"",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"image\"\nprecision = \"fp8\"",
            "models.a.precision",
            "unknown variant `fp8`, expected `fp32` or `fp16`",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"generate\"\ndefaults = { size = \"big\" }",
            "models.a.defaults.size",
            "invalid size",
        ),
        (
            "[models.\"a/b\"]\npath = \"a.pt\"\nkind = \"tensor\"",
            "models.a/b",
            "model name may use only",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"tensor\"\nmax_batch = 0",
            "models.a.max_batch",
            "must be from 1 (no batching) to 1024",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"image\"\nmax_batch = 1025",
            "models.a.max_batch",
            "must be from 1 (no batching) to 1024",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"generate\"\nmax_batch = 2",
            "models.a.max_batch",
            "applies only to models of kind \"image\" and \"tensor\"",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"image\"\nbatch_window = \"2s\"",
            "models.a.batch_window",
            "must be at most 1s",
        ),
        (
            "[models.a]\npath = \"a.pt\"\nkind = \"image\"\nbatch_window = \"soon\"",
            "models.a.batch_window",
            "invalid duration",
        ),
    ];
    for (text, key, problem) in cases {
        let error = parse(text).unwrap_err();
        assert_eq!(error.key.as_deref(), Some(key), "{text}: {error}");
        assert!(error.problem.contains(problem), "{text}: {error}");
        assert!(error.to_string().starts_with("test.toml"), "{error}");
    }
}

#[test]
fn syntax_errors_have_a_location() {
    let error = parse("[daemon\n").unwrap_err();
    assert_eq!(error.location.map(|l| l.0), Some(1), "{error}");
    assert!(error.problem.starts_with("invalid TOML"), "{error}");
}

#[test]
fn a_missing_file_is_named() {
    let source = ConfigSource::File("/nonexistent/gpuctld.toml".into());
    let error = source.load().unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("/nonexistent/gpuctld.toml: cannot read the file"),
        "{error}"
    );
}

#[test]
fn a_save_is_read_only_from_a_regular_file_and_a_fifo_does_not_block() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpuctld.toml");
    std::fs::write(&path, "[policy]\nkeep_alive = \"1m\"\n").unwrap();
    let source = ConfigSource::File(path.clone());
    let loaded = source.load().unwrap();
    let text = source.read_regular().unwrap();
    assert_eq!(text_digest(&text), loaded.digest);
    std::fs::remove_file(&path).unwrap();
    let c_path = std::ffi::CString::new(path.display().to_string()).unwrap();
    // SAFETY: c_path is a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // No writer ever comes: a blocking open would hang this test.
    let error = source.read_regular().unwrap_err();
    assert!(error.to_string().contains("not a regular file"), "{error}");
}

#[test]
fn values_parse() {
    let config = parse(
        "[daemon]\nsocket_mode = \"0600\"\nmax_frame = \"2MiB\"\n[policy]\nkeep_alive = \"forever\"\n\
         [models.m]\npath = \"/abs/m.pt\"\nkind = \"image\"\ndevice = \"cuda:1\"\nkeep_alive = \"0s\"",
    )
    .unwrap();
    assert_eq!(config.daemon.socket_mode, Mode(0o600));
    assert_eq!(config.daemon.max_frame, Bytes(2 << 20));
    let models = config.model_infos();
    assert_eq!(models[0].device, "cuda:1");
    assert_eq!(
        models[0].path, "/abs/m.pt",
        "absolute paths ignore model_root"
    );
    assert_eq!(models[0].keep_alive, KeepAlive::Millis(0));
}
