//! A format-neutral FHIR element tree.
//!
//! FHIR JSON and FHIR XML describe the same logical tree with different rules
//! (arrays vs. repeated elements, `_name` companions vs. nested extensions,
//! `value` attributes vs. bare JSON values). Both codecs translate to and from
//! this tree, so the typed layer above (`Parameters`, the Idat `Patient`) is
//! written once and both wire formats stay consistent by construction.

/// A complex element or the body of a resource: an ordered list of named children.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Node {
    pub children: Vec<Child>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Child {
    pub name: String,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Primitive(Primitive),
    Complex(Node),
    Resource(Resource),
}

/// A primitive: its lexical value as it appeared on the wire (kept as text so
/// instants and decimals round-trip exactly), plus the element id and
/// extensions FHIR allows on primitives.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Primitive {
    pub value: Option<String>,
    pub id: Option<String>,
    pub extension: Vec<Node>,
}

impl Primitive {
    pub fn new(value: impl Into<String>) -> Self {
        Primitive {
            value: Some(value.into()),
            id: None,
            extension: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub resource_type: String,
    pub node: Node,
}

impl Resource {
    pub fn new(resource_type: impl Into<String>) -> Self {
        Resource {
            resource_type: resource_type.into(),
            node: Node::default(),
        }
    }
}

impl Node {
    pub fn new() -> Self {
        Node::default()
    }

    pub fn push(&mut self, name: impl Into<String>, value: Value) -> &mut Self {
        self.children.push(Child {
            name: name.into(),
            value,
        });
        self
    }

    pub fn push_primitive(&mut self, name: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.push(name, Value::Primitive(Primitive::new(value)))
    }

    pub fn push_complex(&mut self, name: impl Into<String>, node: Node) -> &mut Self {
        self.push(name, Value::Complex(node))
    }

    /// Builder form of `push_primitive`.
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.push_primitive(name, value);
        self
    }

    /// Builder form of `push_complex`.
    pub(crate) fn with_node(mut self, name: &str, node: Node) -> Self {
        self.push_complex(name, node);
        self
    }

    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.children.iter().filter(move |c| c.name == name).map(|c| &c.value)
    }

    pub fn first(&self, name: &str) -> Option<&Value> {
        self.children.iter().find(|c| c.name == name).map(|c| &c.value)
    }

    /// The lexical value of the first primitive child called `name`.
    pub fn str(&self, name: &str) -> Option<&str> {
        match self.first(name)? {
            Value::Primitive(p) => p.value.as_deref(),
            _ => None,
        }
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        match self.first(name)? {
            Value::Complex(n) => Some(n),
            _ => None,
        }
    }

    pub fn nodes<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.all(name).filter_map(|v| match v {
            Value::Complex(n) => Some(n),
            _ => None,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.children.iter().map(|c| c.name.as_str())
    }
}

impl Value {
    pub(crate) fn as_primitive(&self) -> Option<&Primitive> {
        match self {
            Value::Primitive(p) => Some(p),
            _ => None,
        }
    }
}
