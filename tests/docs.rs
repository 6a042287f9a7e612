//! The documentation's flag tables against the flags themselves: every flag
//! `streambridge --help` lists, with its environment variable, must appear in
//! README.md and docs/operations.md, and no table may name a flag that does
//! not exist.

use clap::CommandFactory;
use streambridge::Config;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).expect(path)
}

/// `(--flag, ENV)` for every flag of the server.
fn flags() -> Vec<(String, String)> {
    Config::command()
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let env = arg.get_env()?.to_str()?.to_string();
            Some((format!("--{long}"), env))
        })
        .collect()
}

#[test]
fn every_flag_and_its_environment_variable_is_documented() {
    let flags = flags();
    assert!(flags.len() > 20, "{flags:?}");
    for document in ["README.md", "docs/operations.md"] {
        let text = read(document);
        for (flag, env) in &flags {
            assert!(
                text.contains(&format!("`{flag}`")),
                "{document} does not document {flag}"
            );
            // A table may abbreviate a family of variables (`STREAMBRIDGE_WS_*`).
            // Never as wide as `STREAMBRIDGE_*`, which would excuse anything.
            let abbreviated = |text: &str| {
                let mut prefix = env.as_str();
                while let Some((head, _)) = prefix.rsplit_once('_') {
                    if head == "STREAMBRIDGE" {
                        return false;
                    }
                    if text.contains(&format!("`{head}_*`")) {
                        return true;
                    }
                    prefix = head;
                }
                false
            };
            assert!(
                text.contains(env.as_str()) || abbreviated(&text),
                "{document} does not name {env} (or its family) for {flag}"
            );
        }
    }
}

#[test]
fn the_flag_tables_name_no_flag_that_does_not_exist() {
    let known: Vec<String> = flags().into_iter().map(|(flag, _)| flag).collect();
    for document in ["README.md", "docs/operations.md"] {
        for line in read(document).lines().filter(|line| line.starts_with("| `--")) {
            let named = line.split('`').nth(1).unwrap();
            assert!(
                known.iter().any(|flag| flag == named),
                "{document} names {named}, which does not exist"
            );
        }
    }
}
