//! cgroup v1 net_cls and net_prio, for `keepfix rescue`. pidfd_getfd, like a socket received
//! through SCM_RIGHTS, runs the kernel's `__receive_sock()`, which sets the socket's net_cls
//! classid and net_prio index to those of the *caller's* cgroup. A duplicate taken from another
//! net_cls cgroup would so move the program's sockets (a listener, and with it every connection it
//! accepts later) out of the class that tc's cls_cgroup filter or iptables' `-m cgroup --cgroup`
//! rules give them. So, before it takes any duplicate, keepfix moves itself into the process's
//! net_cls and net_prio cgroups: the values the kernel then writes are the ones the sockets
//! already have. Without a v1 net_cls or net_prio hierarchy (cgroup v2 only), nothing is done.

/// One line of /proc/PID/cgroup: `ID:CONTROLLERS:PATH`.
struct Line {
    id: String,
    controllers: Vec<String>,
    path: String,
}

fn cgroups(pid: Option<u32>) -> std::io::Result<Vec<Line>> {
    let file = pid.map_or_else(|| "/proc/self/cgroup".to_string(), |p| format!("/proc/{p}/cgroup"));
    Ok(std::fs::read_to_string(file)?
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let id = parts.next()?.to_string();
            let controllers = parts.next()?.split(',').map(str::to_string).collect();
            let path = parts.next()?.to_string();
            Some(Line { id, controllers, path })
        })
        .collect())
}

/// Where the v1 hierarchy of these controllers is mounted (in keepfix's mount namespace), as
/// (mount root inside the hierarchy, mount point).
fn mount_of(controllers: &[String]) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let f: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        let (root, point) = (f.get(3)?, f.get(4)?);
        let (fstype, superopts) = (r.first()?, r.get(2)?);
        let opts: Vec<&str> = superopts.split(',').collect();
        (*fstype == "cgroup" && controllers.iter().all(|c| opts.contains(&c.as_str())))
            .then(|| (root.to_string(), point.replace("\\040", " ")))
    })
}

/// Moves keepfix into `pid`'s net_cls and net_prio cgroups (where they differ from keepfix's).
/// Err: why it cannot, and so why a duplicate would move the sockets out of their class.
pub fn join(pid: u32) -> Result<(), String> {
    let Ok(theirs) = cgroups(Some(pid)) else { return Ok(()) }; // gone: the caller finds out
    let ours = cgroups(None).unwrap_or_default();
    for line in theirs.iter().filter(|l| l.controllers.iter().any(|c| c == "net_cls" || c == "net_prio")) {
        if ours.iter().any(|o| o.id == line.id && o.path == line.path) {
            continue;
        }
        let names = line.controllers.join(",");
        let why = |what: String| {
            format!(
                "its sockets are in the {names} cgroup {} (cgroup v1), keepfix is not, and a duplicate would move \
                 them to keepfix's class: {what}",
                line.path
            )
        };
        let Some((root, point)) = mount_of(&line.controllers) else {
            return Err(why(format!("the {names} hierarchy is not mounted where keepfix can join it")));
        };
        let inner = if root == "/" { Some(line.path.as_str()) } else { line.path.strip_prefix(root.as_str()) };
        let Some(inner) = inner else {
            return Err(why(format!("the {names} mount at {point} does not reach it")));
        };
        let procs = format!("{}/{}/cgroup.procs", point.trim_end_matches('/'), inner.trim_start_matches('/'));
        std::fs::write(&procs, std::process::id().to_string())
            .map_err(|e| why(format!("cannot join it through {procs} ({})", crate::output::io_error(&e))))?;
    }
    Ok(())
}
