//! Per-method policy (`--policy PATH`): an ordered list of rules in TOML;
//! the first rule whose `methods` match a call's method decides who may
//! make it.
//!
//! ```toml
//! [[rules]]
//! methods = ["/pkg.Service/Public"]           # exact, or "/pkg.Service/*"
//! allow = "anyone"
//!
//! [[rules]]
//! methods = ["/pkg.Service/Write", "/pkg.Admin/*"]
//! allow = "authenticated"
//! claims = { scope = "pkg:write" }            # all must hold
//! ```
//!
//! A call no rule matches needs what it needed before there was a policy:
//! nothing when authentication is off, else a token (the shared one or a
//! JWT). Health and reflection stay open to anyone unless a rule names
//! them. `claims` hold when the caller's verified JWT has each: `scope` as a
//! space-separated list that contains the value, any other claim equal to
//! it (a string, or the JSON text of another value). A caller refused by a
//! rule gets PERMISSION_DENIED naming the method; one that had to
//! authenticate and did not, UNAUTHENTICATED as without a policy.
//!
//! The file is read at start (an error names the rule) and again on
//! SIGHUP; a file that does not load then keeps the rules in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use serde::Deserialize;
use serde_json::Value;

use super::jwt::Identity;

/// Who may make a call, as a rule says.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Allow {
    /// Anyone, with or without a token.
    Anyone,
    /// A caller that authenticated (and holds the rule's claims).
    Authenticated,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    methods: Vec<String>,
    allow: Allow,
    #[serde(default)]
    claims: BTreeMap<String, String>,
}

/// One method pattern.
#[derive(Debug, PartialEq, Eq)]
enum Pattern {
    /// `/pkg.Service/Method`.
    Method(String),
    /// `/pkg.Service/*`: kept as `/pkg.Service/`.
    Service(String),
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, String> {
        let shape_error = || format!("method pattern {text:?} is not /package.Service/Method or /package.Service/*");
        let rest = text.strip_prefix('/').ok_or_else(shape_error)?;
        let (service, method) = rest.split_once('/').ok_or_else(shape_error)?;
        if service.is_empty() || method.is_empty() || method.contains('/') || service.contains('*') {
            return Err(shape_error());
        }
        match method {
            "*" => Ok(Pattern::Service(format!("/{service}/"))),
            method if method.contains('*') => Err(shape_error()),
            _ => Ok(Pattern::Method(text.to_string())),
        }
    }

    fn matches(&self, method: &str) -> bool {
        match self {
            Pattern::Method(exact) => method == exact,
            Pattern::Service(prefix) => method.starts_with(prefix.as_str()),
        }
    }
}

/// One rule, as checked.
#[derive(Debug)]
pub struct Rule {
    /// Its place in the file (1-based), for messages.
    number: usize,
    patterns: Vec<Pattern>,
    pub allow: Allow,
    claims: Vec<(String, String)>,
}

impl Rule {
    /// Whether `identity` holds every claim the rule asks for.
    fn claims_hold(&self, identity: Option<&Identity>) -> bool {
        if self.claims.is_empty() {
            return true;
        }
        let Some(identity) = identity else { return false };
        self.claims
            .iter()
            .all(|(name, wanted)| match identity.claims().get(name) {
                Some(Value::String(value)) if name == "scope" => value.split(' ').any(|scope| scope == wanted),
                Some(Value::Array(values)) if name == "scope" => values.iter().any(|v| v.as_str() == Some(wanted)),
                Some(Value::String(value)) => value == wanted,
                Some(other) => serde_json::from_str::<Value>(wanted).is_ok_and(|wanted| wanted == *other),
                None => false,
            })
    }
}

/// The rules of a policy file, in order.
#[derive(Debug, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

/// What a policy says about one call.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Made by anyone: a token, if one comes, may still name the caller.
    Open,
    /// Needs a caller that authenticated.
    NeedsCaller,
}

impl Rules {
    /// Reads and checks a policy file; an error names the file and the rule.
    pub fn load(path: &Path) -> Result<Rules, String> {
        let named = |why: String| format!("--policy {}: {why}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| named(e.to_string()))?;
        let file: PolicyFile = toml::from_str(&text).map_err(|e| named(e.to_string()))?;
        let mut rules = Vec::with_capacity(file.rules.len());
        for (index, rule) in file.rules.into_iter().enumerate() {
            let number = index + 1;
            if rule.methods.is_empty() {
                return Err(named(format!("rule {number}: `methods` is empty")));
            }
            let patterns = rule
                .methods
                .iter()
                .map(|text| Pattern::parse(text))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|why| named(format!("rule {number}: {why}")))?;
            if rule.allow == Allow::Anyone && !rule.claims.is_empty() {
                return Err(named(format!(
                    "rule {number}: `claims` need an authenticated caller, not `anyone`"
                )));
            }
            rules.push(Rule {
                number,
                patterns,
                allow: rule.allow,
                claims: rule.claims.into_iter().collect(),
            });
        }
        Ok(Rules { rules })
    }

    /// The first rule that matches `method`.
    pub fn rule_for(&self, method: &str) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|rule| rule.patterns.iter().any(|p| p.matches(method)))
    }

    /// The first rule that asks for an authenticated caller, if any.
    pub fn first_needing_a_caller(&self) -> Option<usize> {
        self.rules
            .iter()
            .find(|rule| rule.allow == Allow::Authenticated)
            .map(|rule| rule.number)
    }

    /// Whether any rule lets anyone in (then a WebSocket may open without
    /// a token: its calls are checked one by one).
    pub fn opens_anything(&self) -> bool {
        self.rules.iter().any(|rule| rule.allow == Allow::Anyone)
    }
}

/// The policy in force, shared by every transport, replaced on SIGHUP.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    path: Option<PathBuf>,
    rules: Arc<RwLock<Arc<Rules>>>,
}

/// What `rules` say about `method`.
fn verdict(rules: &Rules, method: &str, auth_on: bool) -> Verdict {
    match rules.rule_for(method) {
        Some(rule) if rule.allow == Allow::Anyone => Verdict::Open,
        Some(_) => Verdict::NeedsCaller,
        None if !auth_on || is_public_method(method) => Verdict::Open,
        None => Verdict::NeedsCaller,
    }
}

/// gRPC services that reveal no data and that tools call without
/// credentials (load balancers, grpcurl): open unless a rule names them.
pub fn is_public_method(path: &str) -> bool {
    [
        "/grpc.health.v1.Health/",
        "/grpc.reflection.v1.ServerReflection/",
        "/grpc.reflection.v1alpha.ServerReflection/",
    ]
    .iter()
    .any(|prefix| path.starts_with(prefix))
}

impl Policy {
    /// The policy of `path`, read now; none without a path.
    pub fn load(path: Option<&Path>) -> Result<Policy, String> {
        let rules = match path {
            Some(path) => Rules::load(path)?,
            None => Rules::default(),
        };
        Ok(Policy {
            path: path.map(Path::to_path_buf),
            rules: Arc::new(RwLock::new(Arc::new(rules))),
        })
    }

    /// The first rule that asks for an authenticated caller, if any.
    pub fn first_needing_a_caller(&self) -> Option<usize> {
        self.rules().first_needing_a_caller()
    }

    /// Reads the file again (SIGHUP); on an error the rules in force stay.
    /// A rule asking for a caller is an error without authentication
    /// (`auth_on`), as at start.
    pub fn reload(&self, auth_on: bool) -> Result<(), String> {
        let Some(path) = &self.path else { return Ok(()) };
        let rules = Rules::load(path)?;
        if let Some(rule) = rules.first_needing_a_caller()
            && !auth_on
        {
            return Err(format!(
                "--policy {}: rule {rule} asks for an authenticated caller, but neither --auth-token nor --jwt-jwks is set",
                path.display()
            ));
        }
        *self.rules.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(rules);
        Ok(())
    }

    fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Whether a call to `method` needs a caller that authenticated, when
    /// authentication is on (`auth_on`).
    pub fn verdict(&self, method: &str, auth_on: bool) -> Verdict {
        verdict(&self.rules(), method, auth_on)
    }

    /// Whether a call of `method` may go on, with one look at the rules (a
    /// SIGHUP between two looks could mix two files): UNAUTHENTICATED when
    /// it needs a caller and has none (`anonymous`), PERMISSION_DENIED when
    /// its rule asks for claims `identity` does not hold.
    pub fn check(
        &self,
        method: &str,
        auth_on: bool,
        anonymous: bool,
        identity: Option<&Identity>,
    ) -> Result<(), tonic::Status> {
        let rules = self.rules();
        if anonymous && verdict(&rules, method, auth_on) == Verdict::NeedsCaller {
            return Err(tonic::Status::unauthenticated(
                "missing bearer token: send the metadata `authorization: Bearer <token>`",
            ));
        }
        match rules.rule_for(method) {
            Some(rule) if !rule.claims_hold(identity) => Err(tonic::Status::permission_denied(format!(
                "{method} needs claims the caller's token does not have (--policy, rule {})",
                rule.number
            ))),
            _ => Ok(()),
        }
    }

    /// Whether a WebSocket may open without a token.
    pub fn opens_anything(&self) -> bool {
        self.rules().opens_anything()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Result<Rules, String> {
        let path = std::env::temp_dir().join(format!(
            "streambridge-policy-{}-{}.toml",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&path, text).unwrap();
        let rules = Rules::load(&path);
        std::fs::remove_file(path).unwrap();
        rules
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let rules = rules(
            r#"
            [[rules]]
            methods = ["/pkg.Service/Public"]
            allow = "anyone"
            [[rules]]
            methods = ["/pkg.Service/*", "/pkg.Admin/*"]
            allow = "authenticated"
            "#,
        )
        .unwrap();
        assert_eq!(rules.rule_for("/pkg.Service/Public").unwrap().allow, Allow::Anyone);
        assert_eq!(
            rules.rule_for("/pkg.Service/Write").unwrap().allow,
            Allow::Authenticated
        );
        assert_eq!(rules.rule_for("/pkg.Admin/Drop").unwrap().number, 2);
        assert!(
            rules.rule_for("/pkg.ServiceX/Write").is_none(),
            "a service pattern is not a prefix of names"
        );
        assert!(rules.rule_for("/other.Service/Write").is_none());
    }

    #[test]
    fn a_reload_that_fails_keeps_the_rules_in_force() {
        let path = std::env::temp_dir().join(format!("streambridge-policy-{}-reload.toml", std::process::id()));
        std::fs::write(&path, "[[rules]]\nmethods = [\"/a.B/*\"]\nallow = \"anyone\"").unwrap();
        let policy = Policy::load(Some(&path)).unwrap();
        assert_eq!(policy.verdict("/a.B/C", true), Verdict::Open);
        std::fs::write(&path, "[[rules]]\nmethods = [\"/a.B/*\"]\nallow = \"nobody\"").unwrap();
        assert!(policy.reload(true).unwrap_err().contains("unknown variant"));
        assert_eq!(policy.verdict("/a.B/C", true), Verdict::Open, "the rules in force stay");
        std::fs::write(&path, "[[rules]]\nmethods = [\"/a.B/*\"]\nallow = \"authenticated\"").unwrap();
        assert!(
            policy.reload(false).unwrap_err().contains("rule 1"),
            "no way to authenticate"
        );
        policy.reload(true).unwrap();
        assert_eq!(policy.verdict("/a.B/C", true), Verdict::NeedsCaller);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_broken_file_is_refused_naming_the_rule() {
        for (text, expected) in [
            (
                "[[rules]]\nmethods = [\"pkg.Service/X\"]\nallow = \"anyone\"",
                "rule 1: method pattern",
            ),
            (
                "[[rules]]\nmethods = [\"/pkg.*/X\"]\nallow = \"anyone\"",
                "rule 1: method pattern",
            ),
            (
                "[[rules]]\nmethods = [\"/a/B\"]\nallow = \"anyone\"\n[[rules]]\nmethods = []\nallow = \"anyone\"",
                "rule 2: `methods` is empty",
            ),
            (
                "[[rules]]\nmethods = [\"/a/B\"]\nallow = \"everyone\"",
                "unknown variant",
            ),
            (
                "[[rules]]\nmethods = [\"/a/B\"]\nallow = \"anyone\"\nclaims = { sub = \"x\" }",
                "rule 1: `claims`",
            ),
            ("[[rules]]\nmethod = [\"/a/B\"]\nallow = \"anyone\"", "unknown field"),
        ] {
            let error = rules(text).unwrap_err();
            assert!(
                error.contains("--policy") && error.contains(expected),
                "{text}: {error}"
            );
        }
    }
}
