/*
 * A single OpenSearch node for `tally engines up opensearch`, run from jars on the
 * classpath (Maven Central) instead of a distribution tarball.
 *
 * The stock bootstrap (org.opensearch.bootstrap.OpenSearch) loads its modules from the
 * tarball's modules/ directory, which Maven Central does not publish. This launcher does
 * what OpenSearch's own MockNode and the public "runner" projects do: it constructs a
 * Node with the module plugins given as classes already on the classpath. What that
 * skips, compared with the stock bootstrap: the Java security manager and its policy
 * files, the bootstrap checks (heap, file descriptors, mmap count, memory lock: a
 * production node refuses to start without them, a loopback test node need not), JNA
 * natives (no memory lock, no seccomp), the keystore (no secure settings), and the
 * modules not listed below (ingest pipelines, reindex, percolator, repositories...).
 *
 * Usage: java -cp lib/*:classes TallyOpenSearchNode CONFIG_DIR
 * CONFIG_DIR holds opensearch.yml; the node runs until SIGTERM, then closes cleanly.
 */

import java.nio.file.Path;
import java.util.Collection;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import org.opensearch.analysis.common.CommonAnalysisPlugin;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.index.mapper.MapperExtrasPlugin;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.painless.PainlessPlugin;
import org.opensearch.plugins.Plugin;
import org.opensearch.transport.Netty4Plugin;

public final class TallyOpenSearchNode extends Node {
    private static final List<Class<? extends Plugin>> MODULES = List.of(
        Netty4Plugin.class, CommonAnalysisPlugin.class, MapperExtrasPlugin.class, PainlessPlugin.class);

    private TallyOpenSearchNode(Environment environment, Collection<Class<? extends Plugin>> plugins) {
        super(environment, plugins, true);
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: TallyOpenSearchNode CONFIG_DIR");
            System.exit(2);
        }
        Path config = Path.of(args[0]).toAbsolutePath();
        Settings settings = Settings.builder().loadFromPath(config.resolve("opensearch.yml")).build();
        Environment environment = InternalSettingsPreparer.prepareEnvironment(
            settings, Map.of(), config, () -> settings.get("node.name"));
        Node node = new TallyOpenSearchNode(environment, MODULES);
        CountDownLatch closed = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
            } catch (Exception e) {
                e.printStackTrace();
            } finally {
                closed.countDown();
            }
        }, "tally-opensearch-shutdown"));
        node.start();
        System.out.println("tally: opensearch node started");
        closed.await(); // the node's threads are daemons: keep the JVM alive until closed
    }
}
