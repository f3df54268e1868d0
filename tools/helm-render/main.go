// helm-render renders a Helm chart's templates without helm, for tests.
//
// It uses the engine Helm itself uses (text/template + sprig) and adds the
// Helm built-ins our chart relies on: .Values (values.yaml coalesced with -f
// files and --set pairs), .Release, .Chart, .Template, include, required,
// toYaml, fromYaml, toJson, fromJson. Values are normalised through JSON the
// way Helm does (numbers become float64), so type mistakes that would break
// under helm break here too. Output is every rendered manifest, each preceded
// by "---" and a "# Source:" comment, like `helm template`.
//
// Build: GO111MODULE=off GOPATH=/usr/share/gocode go build -o helm-render .
// (Debian: golang-go, golang-github-masterminds-sprig-dev, golang-gopkg-yaml.v2-dev)
//
// Usage: helm-render [-f values.yaml]... [--set a.b=c]... [--name R] [--namespace N] CHART_DIR
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v2"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var files, sets listFlag
	flag.Var(&files, "f", "values file to merge over values.yaml (repeatable)")
	flag.Var(&sets, "set", "key.path=value to merge last (repeatable)")
	name := flag.String("name", "release-name", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: helm-render [-f values.yaml]... [--set k=v]... [--name R] [--namespace N] CHART_DIR")
		os.Exit(2)
	}
	out, err := render(flag.Arg(0), files, sets, *name, *namespace)
	if err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
	fmt.Print(out)
}

func render(chartDir string, files, sets []string, name, namespace string) (string, error) {
	var meta struct {
		Name        string `yaml:"name"`
		Version     string `yaml:"version"`
		AppVersion  string `yaml:"appVersion"`
		Description string `yaml:"description"`
		Type        string `yaml:"type"`
		KubeVersion string `yaml:"kubeVersion"`
	}
	raw, err := os.ReadFile(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		return "", err
	}
	if err := yaml.Unmarshal(raw, &meta); err != nil {
		return "", fmt.Errorf("Chart.yaml: %w", err)
	}

	values, err := readValues(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		return "", err
	}
	for _, f := range files {
		override, err := readValues(f)
		if err != nil {
			return "", err
		}
		values = coalesce(values, override)
	}
	for _, s := range sets {
		override, err := parseSet(s)
		if err != nil {
			return "", err
		}
		values = coalesce(values, override)
	}

	top := map[string]interface{}{
		"Values": values,
		"Release": map[string]interface{}{
			"Name": name, "Namespace": namespace, "Service": "Helm",
			"IsInstall": true, "IsUpgrade": false, "Revision": 1,
		},
		"Chart": map[string]interface{}{
			"Name": meta.Name, "Version": meta.Version, "AppVersion": meta.AppVersion,
			"Description": meta.Description, "Type": meta.Type, "KubeVersion": meta.KubeVersion,
		},
		"Capabilities": map[string]interface{}{},
	}

	names, t, err := parseTemplates(chartDir, meta.Name)
	if err != nil {
		return "", err
	}
	var out strings.Builder
	for _, n := range names {
		// Partials (_helpers.tpl) are only included; NOTES.txt is not a manifest.
		if strings.HasPrefix(path.Base(n), "_") || strings.HasSuffix(n, "NOTES.txt") {
			continue
		}
		top["Template"] = map[string]interface{}{"Name": n, "BasePath": meta.Name + "/templates"}
		var buf strings.Builder
		if err := t.ExecuteTemplate(&buf, n, top); err != nil {
			return "", err
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if strings.TrimSpace(text) == "" {
			continue
		}
		fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", n, strings.Trim(text, "\n"))
	}
	return out.String(), nil
}

// parseTemplates parses every file under templates/ into one template set,
// named "<chart>/templates/<path>" as Helm names them, in sorted order.
func parseTemplates(chartDir, chartName string) ([]string, *template.Template, error) {
	root := filepath.Join(chartDir, "templates")
	t := template.New("gotpl").Option("missingkey=zero")
	t.Funcs(funcMap(t))
	var names []string
	err := filepath.Walk(root, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		n := path.Join(chartName, "templates", filepath.ToSlash(rel))
		src, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if _, err := t.New(n).Parse(string(src)); err != nil {
			return err
		}
		names = append(names, n)
		return nil
	})
	sort.Strings(names)
	return names, t, err
}

func funcMap(t *template.Template) template.FuncMap {
	f := sprig.TxtFuncMap()
	delete(f, "env")
	delete(f, "expandenv")
	f["toYaml"] = toYAML
	f["fromYaml"] = fromYAML
	f["toJson"] = func(v interface{}) string { b, _ := json.Marshal(v); return string(b) }
	f["fromJson"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	f["include"] = func(name string, data interface{}) (string, error) {
		var buf strings.Builder
		err := t.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	f["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil {
			return v, errors.New(msg)
		}
		if s, ok := v.(string); ok && s == "" {
			return v, errors.New(msg)
		}
		return v, nil
	}
	// No cluster here: lookup finds nothing, as under `helm template`.
	f["lookup"] = func(string, string, string, string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	return f
}

// toYAML marshals like Helm's (sigs.k8s.io/yaml): through JSON, keys sorted,
// no trailing newline.
func toYAML(v interface{}) string {
	j, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	var generic interface{}
	if err := yaml.Unmarshal(j, &generic); err != nil {
		return ""
	}
	y, err := yaml.Marshal(generic)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(y), "\n")
}

func fromYAML(s string) map[string]interface{} {
	m := map[string]interface{}{}
	var generic interface{}
	if err := yaml.Unmarshal([]byte(s), &generic); err != nil {
		m["Error"] = err.Error()
		return m
	}
	if norm, ok := normalise(generic).(map[string]interface{}); ok {
		return norm
	}
	return m
}

func readValues(file string) (map[string]interface{}, error) {
	raw, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var generic interface{}
	if err := yaml.Unmarshal(raw, &generic); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if generic == nil {
		return map[string]interface{}{}, nil
	}
	m, ok := normalise(generic).(map[string]interface{})
	if !ok {
		return nil, fmt.Errorf("%s: top level is not a mapping", file)
	}
	return m, nil
}

// normalise turns yaml.v2's map[interface{}]interface{} into JSON-shaped data
// (map[string]interface{}, []interface{}, float64, string, bool, nil), which
// is what Helm's templates see.
func normalise(v interface{}) interface{} {
	j, err := json.Marshal(stringKeys(v))
	if err != nil {
		return v
	}
	var out interface{}
	_ = json.Unmarshal(j, &out)
	return out
}

func stringKeys(v interface{}) interface{} {
	switch x := v.(type) {
	case map[interface{}]interface{}:
		m := make(map[string]interface{}, len(x))
		for k, val := range x {
			m[fmt.Sprint(k)] = stringKeys(val)
		}
		return m
	case []interface{}:
		for i := range x {
			x[i] = stringKeys(x[i])
		}
		return x
	}
	return v
}

// coalesce merges override into base like Helm: maps merge recursively,
// anything else replaces, and an explicit null deletes the key.
func coalesce(base, override map[string]interface{}) map[string]interface{} {
	out := make(map[string]interface{}, len(base))
	for k, v := range base {
		out[k] = v
	}
	for k, v := range override {
		if v == nil {
			delete(out, k)
			continue
		}
		bm, bok := out[k].(map[string]interface{})
		om, ook := v.(map[string]interface{})
		if bok && ook {
			out[k] = coalesce(bm, om)
		} else {
			out[k] = v
		}
	}
	return out
}

// parseSet turns "a.b.c=value" into {a: {b: {c: value}}}; the value is typed
// like a YAML scalar (true, 3, null, text).
func parseSet(s string) (map[string]interface{}, error) {
	key, raw, ok := strings.Cut(s, "=")
	if !ok || key == "" {
		return nil, fmt.Errorf("--set %q: want key=value", s)
	}
	var val interface{} = raw
	switch {
	case raw == "true" || raw == "false":
		val = raw == "true"
	case raw == "null":
		val = nil
	default:
		if n, err := strconv.ParseFloat(raw, 64); err == nil {
			val = n
		}
	}
	parts := strings.Split(key, ".")
	m := map[string]interface{}{parts[len(parts)-1]: val}
	for i := len(parts) - 2; i >= 0; i-- {
		m = map[string]interface{}{parts[i]: m}
	}
	return m, nil
}
