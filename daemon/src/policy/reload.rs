//! What a reload means for each configured model.

use crate::config::{Config, ModelConfig};

/// What a reload means for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelChange {
    /// New in the configuration: it appears, unloaded.
    Added,
    /// Gone from the configuration: unloaded once its work is done.
    Removed,
    /// Its settings or resolved path changed: replaced once idle.
    Changed,
    /// Same settings, but the file on disk is not the one it loaded.
    FileReplaced,
}

/// Compares two configurations model by model. `file_replaced` says whether
/// a loaded model's file changed on disk since it was loaded. Models not
/// listed are unchanged: their workers keep running, and a new keep-alive
/// applies to them at once.
pub fn reload_changes(
    old: &Config,
    new: &Config,
    file_replaced: &dyn Fn(&str) -> bool,
) -> Vec<(String, ModelChange)> {
    let mut changes = Vec::new();
    for (name, before) in &old.models {
        match new.models.get(name) {
            None => changes.push((name.clone(), ModelChange::Removed)),
            Some(after) => {
                // keep_alive, vram and load_timeout never need a new worker.
                let comparable = |m: &ModelConfig| ModelConfig {
                    keep_alive: None,
                    vram: None,
                    load_timeout: None,
                    ..m.clone()
                };
                if comparable(before) != comparable(after)
                    || old.model_path(before) != new.model_path(after)
                {
                    changes.push((name.clone(), ModelChange::Changed));
                } else if file_replaced(name) {
                    changes.push((name.clone(), ModelChange::FileReplaced));
                }
            }
        }
    }
    for name in new
        .models
        .keys()
        .filter(|name| !old.models.contains_key(*name))
    {
        changes.push((name.clone(), ModelChange::Added));
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_is_compared_model_by_model() {
        let parse = |text: &str| Config::parse(text, "t.toml").unwrap();
        let old = parse(
            "[models.same]\npath = \"s.pt\"\nkind = \"tensor\"\n\
             [models.gone]\npath = \"g.pt\"\nkind = \"tensor\"\n\
             [models.tuned]\npath = \"t.pt\"\nkind = \"image\"\ntile = 256\n\
             [models.kept]\npath = \"k.pt\"\nkind = \"tensor\"\nkeep_alive = \"1m\"\n",
        );
        let new = parse(
            "[models.same]\npath = \"s.pt\"\nkind = \"tensor\"\n\
             [models.tuned]\npath = \"t.pt\"\nkind = \"image\"\ntile = 512\n\
             [models.kept]\npath = \"k.pt\"\nkind = \"tensor\"\nkeep_alive = \"1h\"\n\
             [models.fresh]\npath = \"f.pt\"\nkind = \"tensor\"\n",
        );
        let mut changes = reload_changes(&old, &new, &|_| false);
        changes.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            changes,
            vec![
                ("fresh".into(), ModelChange::Added),
                ("gone".into(), ModelChange::Removed),
                ("tuned".into(), ModelChange::Changed),
            ],
            "a keep_alive change alone needs no new worker"
        );
        let replaced = reload_changes(&old, &old, &|name| name == "same");
        assert_eq!(replaced, vec![("same".into(), ModelChange::FileReplaced)]);
        let moved = parse(
            "model_root = \"/elsewhere\"\n[models.same]\npath = \"s.pt\"\nkind = \"tensor\"\n",
        );
        assert!(reload_changes(
            &parse("[models.same]\npath = \"s.pt\"\nkind = \"tensor\"\n"),
            &moved,
            &|_| false
        )
        .contains(&("same".into(), ModelChange::Changed)));
    }

    #[test]
    fn a_changed_command_env_cwd_or_options_replaces_the_worker() {
        let parse = |text: &str| Config::parse(text, "t.toml").unwrap();
        let base = "[models.sd]\nkind = \"generate\"\ncommand = [\"python\", \"-m\", \"sd\"]\n";
        let old = parse(base);
        for changed in [
            "[models.sd]\nkind = \"generate\"\ncommand = [\"python3\", \"-m\", \"sd\"]\n",
            &format!("{base}env = {{ HF_HOME = \"/x\" }}\n"),
            &format!("{base}cwd = \"apps\"\n"),
            &format!("{base}options = {{ steps = 4 }}\n"),
            &format!("{base}path = \"sd-folder\"\n"),
        ] {
            assert_eq!(
                reload_changes(&old, &parse(changed), &|_| false),
                vec![("sd".into(), ModelChange::Changed)],
                "{changed}"
            );
        }
        let slower = parse(&format!("{base}load_timeout = \"30m\"\n"));
        assert_eq!(
            reload_changes(&old, &slower, &|_| false),
            vec![],
            "applies to the next load"
        );
    }
}
