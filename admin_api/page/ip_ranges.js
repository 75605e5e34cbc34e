// The "Allowed IP ranges" field, checked line by line as it is typed. The server decides (gateway/ranges.py,
// inet_pton rules); this mirrors it so that most mistakes show before a round trip.

const IPV4_PART = /^(0|[1-9][0-9]{0,2})$/;
const HEX_GROUP = /^[0-9A-Fa-f]{1,4}$/;

function isIPv4(text) {
  const parts = text.split(".");
  return parts.length === 4 && parts.every((part) => IPV4_PART.test(part) && Number(part) <= 255);
}

function groupCount(groups) {
  // Groups of an IPv6 address, where a final dotted IPv4 part counts as two; -1 when one is malformed.
  let count = 0;
  for (const [index, group] of groups.entries()) {
    if (index === groups.length - 1 && group.includes(".")) {
      if (!isIPv4(group)) return -1;
      count += 2;
    } else if (HEX_GROUP.test(group)) {
      count += 1;
    } else {
      return -1;
    }
  }
  return count;
}

function isIPv6(text) {
  const halves = text.split("::");
  if (halves.length > 2) return false;
  if (halves.length === 1) return groupCount(text.split(":")) === 8;
  const [head, tail] = halves.map((half) => (half === "" ? [] : half.split(":")));
  if (head.some((group) => group.includes("."))) return false;
  const heads = groupCount(head);
  const tails = groupCount(tail);
  return heads >= 0 && tails >= 0 && heads + tails <= 7;
}

// Why `line` is not a range the gateway accepts, or null when it is.
export function rangeProblem(line) {
  const invalid = `“${line}” is not an IPv4/IPv6 address or CIDR.`;
  if (line.length > 64) return invalid;
  const slash = line.indexOf("/");
  const address = slash === -1 ? line : line.slice(0, slash);
  const version = isIPv4(address) ? 4 : isIPv6(address) ? 6 : 0;
  if (version === 0) return invalid;
  if (slash !== -1) {
    const prefix = line.slice(slash + 1);
    const width = version === 4 ? 32 : 128;
    if (!/^[0-9]{1,3}$/.test(prefix) || Number(prefix) > width) {
      return `“${line}” has an invalid prefix length /${prefix}.`;
    }
  }
  return null;
}

// The ranges in the field's text (one per line, blank lines ignored) and the problems, by line number.
export function readRanges(text) {
  const ranges = [];
  const problems = [];
  text.split("\n").forEach((raw, index) => {
    const line = raw.trim();
    if (line === "") return;
    const problem = rangeProblem(line);
    if (problem) problems.push({ line: index + 1, message: problem });
    ranges.push(line);
  });
  return { ranges, problems };
}
